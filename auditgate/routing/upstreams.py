"""Which upstream hosts the gateway serves, which it tunnels untouched, and where each upstream's key lives."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from auditgate.core.config import ConfigError, RulesFile, check_keys

UPSTREAMS_FILE = "upstreams.yaml"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


@dataclass(frozen=True)
class Upstream:
    """An upstream API the gateway forwards to on its own credential."""

    host: str
    port: int | None = None  # None: any port
    key_env: str | None = DEFAULT_KEY_ENV
    key_file: str | None = None
    # "authorization" sends "Bearer <key>"; any other header (e.g. Azure's "api-key") carries the bare key.
    key_header: str = "authorization"

    @property
    def key_source(self) -> str:
        """Where the key comes from, safe to record (never the key itself)."""
        return f"file:{self.key_file}" if self.key_file else f"env:{self.key_env}"

    def matches(self, host: str, port: int) -> bool:
        return self.host == host.lower() and (self.port is None or self.port == port)

    def read_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The key's current value, or None when its source is unset or empty."""
        if self.key_file:
            try:
                key = Path(self.key_file).read_text(encoding="utf-8").strip()
            except OSError:
                return None
        else:
            key = (environ.get(self.key_env or "") or "").strip()
        return key or None

    def auth_header_value(self, key: str) -> str:
        return f"Bearer {key}" if self.key_header == "authorization" else key


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        return self.host == host.lower() and (self.port is None or self.port == port)


@dataclass(frozen=True)
class UpstreamTable:
    upstreams: tuple[Upstream, ...] = ()
    passthrough: tuple[HostPort, ...] = ()

    def upstream_for(self, host: str, port: int) -> Upstream | None:
        return next((u for u in self.upstreams if u.matches(host, port)), None)

    def reverse_target(self, host: str, port: int) -> Upstream:
        """In reverse mode the operator chose the target: use its configured entry or the default key."""
        return self.upstream_for(host, port) or Upstream(host=host.lower(), port=port)

    def is_passthrough(self, host: str, port: int) -> bool:
        return any(p.matches(host, port) for p in self.passthrough)

    def route(self, host: str, port: int, reverse: bool) -> Upstream | None:
        """The upstream a request to host:port goes to: in reverse mode the operator's target, else a listed one."""
        return self.reverse_target(host, port) if reverse else self.upstream_for(host, port)


_UPSTREAM_KEYS = {"host", "port", "key_env", "key_file", "key_header"}
_PASSTHROUGH_KEYS = {"host", "port"}


def _host_port(path: Path, where: str, entry: dict, at: tuple = ()) -> tuple[str, int | None]:
    host = entry.get("host")
    # One colon means "host:port" (an IPv6 address has several); slashes mean a URL.
    if not isinstance(host, str) or not host.strip() or "/" in host or " " in host.strip() or host.count(":") == 1:
        raise ConfigError(path, f"{where}: 'host' must be a host name or address without scheme or port, got {host!r}", at=at + ("host",))
    port = entry.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
        raise ConfigError(path, f"{where}: 'port' must be a number from 1 to 65535, got {port!r}", at=at + ("port",))
    return host.strip().lower(), port


def load_upstreams(rules_dir: Path) -> UpstreamTable:
    path = rules_dir / UPSTREAMS_FILE
    file = RulesFile.read(path, {"upstreams", "passthrough"})
    with file.locating():
        return _upstream_table(file)


def _upstream_table(file: RulesFile) -> UpstreamTable:
    path = file.path
    upstreams = []
    for i, entry in enumerate(file.list_of_mappings("upstreams")):
        where = f"upstreams[{i}]"
        check_keys(path, where, entry, _UPSTREAM_KEYS, at=("upstreams", i))
        host, port = _host_port(path, where, entry, ("upstreams", i))
        key_env, key_file = entry.get("key_env"), entry.get("key_file")
        if key_env and key_file:
            raise ConfigError(path, f"{where}: give either 'key_env' or 'key_file', not both", at=("upstreams", i, "key_file"))
        for name, value in (("key_env", key_env), ("key_file", key_file), ("key_header", entry.get("key_header"))):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(path, f"{where}: '{name}' must be a non-empty string", at=("upstreams", i, name))
        upstreams.append(
            Upstream(
                host=host,
                port=port,
                key_env=None if key_file else (key_env or DEFAULT_KEY_ENV),
                key_file=key_file,
                key_header=(entry.get("key_header") or "authorization").lower(),
            )
        )
    passthrough = []
    for i, entry in enumerate(file.list_of_mappings("passthrough")):
        where = f"passthrough[{i}]"
        check_keys(path, where, entry, _PASSTHROUGH_KEYS, at=("passthrough", i))
        passthrough.append(HostPort(*_host_port(path, where, entry, ("passthrough", i))))
    table = UpstreamTable(tuple(upstreams), tuple(passthrough))
    for hp in table.passthrough:
        if table.upstream_for(hp.host, hp.port or 443):
            raise ConfigError(path, f"{hp.host} is listed both as an upstream and as pass-through", at=("passthrough",))
    return table


_loaded: dict[Path, tuple[tuple, UpstreamTable]] = {}


def shared_upstreams(rules_dir: Path) -> UpstreamTable:
    """upstreams.yaml read once for every addon in this process (routing and key custody read the same table).

    Read again only when the file changed; ConfigError when it is invalid.
    """
    path = (rules_dir / UPSTREAMS_FILE).expanduser().absolute()
    try:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:
        stamp = ()
    cached = _loaded.get(path)
    if cached is None or cached[0] != stamp or not stamp:
        cached = _loaded[path] = (stamp, load_upstreams(path.parent))
    return cached[1]
