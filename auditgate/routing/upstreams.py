"""Which upstream hosts the gateway serves, which it tunnels untouched, and where each upstream's key lives."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from auditgate.core.config import ConfigError, RulesFile, check_keys
from auditgate.core.credentials import is_credential_header, is_identity_header

UPSTREAMS_FILE = "upstreams.yaml"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"

# The caller's headers that go on to an upstream when its entry names none (``forward_headers``):
# what the openai SDK and the Agents SDK send besides their credential (a name ending in "*" is a
# prefix). Anything else a caller sends (cookies, tracing headers, another proxy's identity headers,
# OpenAI-Organization / OpenAI-Project) stays at the gateway.
DEFAULT_FORWARD_HEADERS = (
    "accept",
    "accept-encoding",
    "content-type",
    "user-agent",
    "openai-beta",  # the Assistants and trace-ingest APIs' version switch
    "idempotency-key",
    "x-stainless-*",  # the SDKs' platform, retry-count and timeout headers
)
# How a request is framed on the wire (not the caller's to choose, and needed to carry it): always kept.
FRAMING_HEADERS = frozenset({
    "host", "content-length", "content-encoding", "transfer-encoding", "connection", "upgrade", "te",
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
})
# Set from the upstream's entry (``organization``, ``project``), never from the caller: the gateway's
# key decides which organization and project pay and see the request.
GATEWAY_SET_HEADERS = ("openai-organization", "openai-project")
_FIELD_MEMORY = 512
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


@dataclass(frozen=True)
class Upstream:
    """An upstream API the gateway forwards to on its own credential."""

    host: str
    port: int | None = None  # None: any port
    key_env: str | None = DEFAULT_KEY_ENV
    key_file: str | None = None
    # "authorization" sends "Bearer <key>"; any other header (e.g. Azure's "api-key") carries the bare key.
    key_header: str = "authorization"
    # The caller's headers that go on (lowercase names; "x-stainless-*" is a prefix); see DEFAULT_FORWARD_HEADERS.
    forward_headers: tuple[str, ...] = DEFAULT_FORWARD_HEADERS
    organization: str | None = None  # sent as OpenAI-Organization
    project: str | None = None  # sent as OpenAI-Project

    def __post_init__(self) -> None:
        # forwards() runs for every header of every request: the names and prefixes are split once per list.
        names, prefixes, memory = _forward_rule(self.forward_headers)
        object.__setattr__(self, "_forward_names", names)
        object.__setattr__(self, "_forward_prefixes", prefixes)
        object.__setattr__(self, "_forwarded_fields", memory)

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

    def forwards(self, name: str) -> bool:
        """Whether a caller's header of this (lowercase) name goes on to this upstream."""
        return name in self._forward_names or name.startswith(self._forward_prefixes)

    def forwards_field(self, name: bytes) -> bool:
        """forwards() for a header field's raw name, remembered per name (a request has the same few)."""
        known = self._forwarded_fields.get(name)
        if known is None:
            if len(self._forwarded_fields) >= _FIELD_MEMORY:
                self._forwarded_fields.clear()  # names are the caller's to choose: the memory stays small
            known = self._forwarded_fields[name] = self.forwards(name.decode("latin-1").lower())
        return known

    def gateway_headers(self) -> dict[str, str]:
        """The headers the gateway sets itself from this entry (OpenAI-Organization, OpenAI-Project)."""
        headers = {}
        if self.organization:
            headers["openai-organization"] = self.organization
        if self.project:
            headers["openai-project"] = self.project
        return headers


@functools.lru_cache(maxsize=64)
def _forward_rule(forward_headers: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...], dict[bytes, bool]]:
    """A forward_headers list as (exact names, framing ones included; prefixes; a memory of raw field names)."""
    return (FRAMING_HEADERS | {p for p in forward_headers if not p.endswith("*")},
            tuple(p[:-1] for p in forward_headers if p.endswith("*")), {})


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "_reverse_targets", {})

    def reverse_target(self, host: str, port: int) -> Upstream:
        """In reverse mode the operator chose the target: use its configured entry or the default key."""
        # The target is the operator's (a few host:port pairs): worked out once for each.
        targets = self._reverse_targets
        upstream = targets.get((host, port))
        if upstream is None:
            upstream = self.upstream_for(host, port) or Upstream(host=host.lower(), port=port)
            if len(targets) >= _FIELD_MEMORY:
                targets.clear()
            targets[(host, port)] = upstream
        return upstream

    def is_passthrough(self, host: str, port: int) -> bool:
        return any(p.matches(host, port) for p in self.passthrough)

    def route(self, host: str, port: int, reverse: bool) -> Upstream | None:
        """The upstream a request to host:port goes to: in reverse mode the operator's target, else a listed one."""
        return self.reverse_target(host, port) if reverse else self.upstream_for(host, port)


_UPSTREAM_KEYS = {"host", "port", "key_env", "key_file", "key_header", "forward_headers", "organization", "project"}
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


def _has_line_break(value: str) -> bool:
    return any(c in value for c in "\r\n\0")


def _forward_headers(path: Path, where: str, entry: dict, key_header: str, at: tuple) -> tuple[str, ...]:
    names = entry.get("forward_headers")
    if names is None:
        return DEFAULT_FORWARD_HEADERS
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(path, f"{where}: 'forward_headers' must be a list of header names", at=at)
    kept = []
    for name in (n.strip().lower() for n in names):
        plain = name[:-1] if name.endswith("*") else name
        if not plain or not _HEADER_NAME.fullmatch(plain) or "*" in plain:
            raise ConfigError(path, f"{where}: forward_headers: {name!r} is not a header name (or a prefix ending "
                                    "in '*'; a lone '*' is not allowed)", at=at)
        if name.endswith("*"):
            # A prefix may cover credential or identity headers: those are removed whatever this list says.
            kept.append(name)
            continue
        if is_credential_header(name) or name == key_header:
            raise ConfigError(path, f"{where}: forward_headers: {name!r} carries a credential; the caller's never "
                                    "goes upstream (the gateway sends its own key)", at=at)
        if is_identity_header(name):
            raise ConfigError(path, f"{where}: forward_headers: {name!r} asserts an identity; a caller's is "
                                    "never forwarded", at=at)
        if name in GATEWAY_SET_HEADERS:
            raise ConfigError(path, f"{where}: forward_headers: {name!r} is set by the gateway from this entry's "
                                    f"'{name.removeprefix('openai-')}', never taken from the caller", at=at)
        kept.append(name)
    return tuple(dict.fromkeys(kept))


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
        for name in ("organization", "project"):
            value = entry.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip() or _has_line_break(value)):
                raise ConfigError(path, f"{where}: '{name}' must be a non-empty string on one line",
                                  at=("upstreams", i, name))
        key_header = (entry.get("key_header") or "authorization").lower()
        upstreams.append(
            Upstream(
                host=host,
                port=port,
                key_env=None if key_file else (key_env or DEFAULT_KEY_ENV),
                key_file=key_file,
                key_header=key_header,
                forward_headers=_forward_headers(path, where, entry, key_header, ("upstreams", i, "forward_headers")),
                organization=(entry.get("organization") or "").strip() or None,
                project=(entry.get("project") or "").strip() or None,
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
