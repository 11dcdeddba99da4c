"""Which groups may use which upstreams, endpoints and models: the `authorization:` section of identities.yaml.

    authorization:
      grants:
        - groups: [agents]                      # who (a caller in any of these groups); "*": every caller
          upstreams: [api.openai.com]           # optional: host or host:port globs; omitted = every upstream
          endpoints: [/v1/responses, /v1/chat/completions]   # optional: path globs; omitted = every path
          models: [gpt-4.1-mini, "gpt-4o*"]     # optional: globs on the request's "model"; omitted = any

A request is allowed when one grant matches all of it. Without an `authorization:` section every
authenticated caller may use every configured upstream; with one, only what a grant allows.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from auditgate.core.config import (
    ConfigError,
    RulesFile,
    check_keys,
    require_list_of_mappings,
)

ANY_GROUP = "*"
_SECTION_KEYS = {"grants"}
_GRANT_KEYS = {"groups", "upstreams", "endpoints", "models"}
# Percent-encoded dots, slashes and backslashes would let a path match one glob here and mean another upstream.
_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


@dataclass(frozen=True)
class Grant:
    """What callers in some groups may use; None for a dimension means "any"."""

    groups: tuple[str, ...]
    upstreams: tuple[str, ...] | None = None
    endpoints: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    index: int = 0

    def covers(self, groups: tuple[str, ...]) -> bool:
        return ANY_GROUP in self.groups or any(g in self.groups for g in groups)

    def allows_upstream(self, host: str, port: int) -> bool:
        if self.upstreams is None:
            return True
        host = host.lower()
        return any(
            fnmatchcase(host, p) or fnmatchcase(f"{host}:{port}", p) or fnmatchcase(f"[{host}]:{port}", p)
            for p in self.upstreams
        )

    def allows_endpoint(self, path: str) -> bool:
        return self.endpoints is None or any(fnmatchcase(path, p) for p in self.endpoints)

    def allows_model(self, model: str | None) -> bool:
        # A grant limited to some models covers only requests that name one of them.
        return self.models is None or (model is not None and any(fnmatchcase(model, p) for p in self.models))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # for a refusal: what was refused, safe to show the caller
    refused: str | None = None  # "groups", "endpoint_path", "upstream", "endpoint" or "model"
    grant: int | None = None  # the index of the grant that allowed the request

    def as_metadata(self) -> dict:
        if self.allowed:
            return {"decision": "allow", "grant": self.grant}
        return {"decision": "deny", "refused": self.refused, "reason": self.reason}


@dataclass(frozen=True)
class Authorization:
    grants: tuple[Grant, ...]

    def decide(
        self, groups: tuple[str, ...], host: str, port: int, path: str, model: Callable[[], str | None]
    ) -> Decision:
        """Allow or refuse a request; model() is only called (the body only parsed) when a grant limits models."""
        who = f"group(s) [{', '.join(groups)}]" if groups else "a caller without groups"
        grants = [g for g in self.grants if g.covers(groups)]
        if not grants:
            return Decision(False, f"no authorization grant covers {who}", "groups")
        path = path.split("?", 1)[0]
        if not is_normal_path(path):
            return Decision(False, f"endpoint {path!r} is not a normalised path", "endpoint_path")
        grants = [g for g in grants if g.allows_upstream(host, port)]
        if not grants:
            return Decision(False, f"upstream {host}:{port} is not granted to {who}", "upstream")
        grants = [g for g in grants if g.allows_endpoint(path)]
        if not grants:
            return Decision(False, f"endpoint {path} on {host} is not granted to {who}", "endpoint")
        unlimited = next((g for g in grants if g.models is None), None)
        if unlimited:
            return Decision(True, "", grant=unlimited.index)
        name = model()
        allowing = next((g for g in grants if g.allows_model(name)), None)
        if allowing:
            return Decision(True, "", grant=allowing.index)
        if name is None:
            return Decision(False, f"{path} names no model, and {who} may only use named models there", "model")
        return Decision(False, f"model {name!r} is not granted to {who} on {path}", "model")


def is_normal_path(path: str) -> bool:
    """No dot segments, empty segments, backslashes or encoded separators: the path means what it says."""
    if not path.startswith("/") or "//" in path or "\\" in path or _ENCODED_SEPARATOR.search(path):
        return False
    return posixpath.normpath(path) == path.rstrip("/") or path == "/"


def authorization_from(file: RulesFile) -> Authorization | None:
    """The authorization of identities.yaml, or None when it has no `authorization:` section."""
    with file.locating():
        return _authorization(file.path, file.data)


def _authorization(path: Path, data: Mapping) -> Authorization | None:
    if "authorization" not in data:
        return None
    section = data["authorization"]
    if not isinstance(section, dict):
        raise ConfigError(path, "'authorization' must be a mapping with a 'grants' list", at=("authorization",))
    check_keys(path, "authorization", section, _SECTION_KEYS, at=("authorization",))
    entries = require_list_of_mappings(path, "authorization.grants", section.get("grants"), at=("authorization", "grants"))
    return Authorization(tuple(_grant(path, i, entry) for i, entry in enumerate(entries)))


def _grant(path: Path, i: int, entry: dict) -> Grant:
    where = f"authorization.grants[{i}]"

    def line(key: str | None = None) -> tuple:  # where, for the loader to find the line
        return ("authorization", "grants", i, *([key] if key else []))

    unknown = sorted(set(entry) - _GRANT_KEYS)
    if unknown:
        allowed = ", ".join(sorted(_GRANT_KEYS))
        reason = f"{where}: unknown key(s) {', '.join(map(str, unknown))} (allowed: {allowed})"
        raise ConfigError(path, reason, at=line(unknown[0]))

    def patterns(key: str, check: Callable[[str], bool], what: str) -> tuple[str, ...] | None:
        value = entry.get(key)
        if key not in entry:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v and check(v) for v in value):
            raise ConfigError(path, f"{where}: '{key}' must be a non-empty list of {what}", at=line(key))
        return tuple(v.lower() if key == "upstreams" else v for v in value)

    groups = patterns("groups", lambda g: True, "group names ('*' for every caller)")
    if groups is None:
        raise ConfigError(path, f"{where}: 'groups' is required (the groups this grant is for)", at=line())
    return Grant(
        groups=groups,
        upstreams=patterns("upstreams", lambda u: "/" not in u, "host or host:port patterns (no scheme)"),
        endpoints=patterns("endpoints", lambda e: e.startswith("/"), "path patterns starting with '/'"),
        models=patterns("models", lambda m: True, "model name patterns"),
        index=i,
    )
