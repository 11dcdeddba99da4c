"""What an audit entry says about a flow, and the digests of the rules in force (no mitmproxy import)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from auditgate.audit.chain import JSON_SAFE_INT, jcs, json_safe, sha256_hex
from auditgate.audit.errors import describe
from auditgate.audit.record_digest import record_of_flow
from auditgate.core.config import ConfigError, RulesFile
from auditgate.core.flow_contract import (
    APPROVAL,
    BODY_LIMITS,
    FLOW_FILE,
    GUARD,
    IDENTITY,
    INTENT_SEQ,
    MASKING,
    POLICY,
    REFUSAL,
    STREAM_CUT,
    TUNNEL,
    UPSTREAM,
)
from auditgate.core.request_facts import facts_of


def flow_fields(flow, now: float, request_content: tuple | None = None) -> dict:
    """The fields of a flow's audit entry, written before its reply ends: who, where, what was decided and the
    digests of both bodies. The digest of everything the flow's record holds follows in the flow's record entry
    (record_fields), written when the flow recorder takes the record, once the reply is on its way.
    request_content: (the request's content, its SHA-256) from the flow's intent entry, if it had one."""
    request, response = flow.request, flow.response
    peer = flow.client_conn.peername if flow.client_conn else None
    return {
        "flow_id": flow.id,
        "identity": json_safe(IDENTITY.get(flow)),
        "client": peer[0] if peer else None,
        "upstream": json_safe(UPSTREAM.get(flow)),
        "method": request.method,
        "host": pretty_host(request),
        "port": request.port,
        "path": request.path.partition("?")[0],  # a query string may carry a key; the flow file has it all
        "model": facts_of(flow).model,
        "status": response.status_code if response else None,
        "error": flow.error.msg if flow.error else None,
        "streamed": bool(response and response.stream),
        "latency_us": max(0, int((now - request.timestamp_start) * 1_000_000)),
        "policy": json_safe(POLICY.get(flow)),
        "approval": json_safe(APPROVAL.get(flow)),
        "masking": json_safe(MASKING.get(flow)),
        "refusal": json_safe(REFUSAL.get(flow)),
        "guard": json_safe(GUARD.get(flow)),  # a hook of the bundle that failed on this flow, and what it caused
        "tunnel": json_safe(TUNNEL.get(flow)),  # a CONNECT: who tunnelled where (or why it was refused)
        "body_limits": json_safe(BODY_LIMITS.get(flow)),
        "request_sha256": sha256_hex(request.raw_content, request_content),
        "response_sha256": sha256_hex(response.raw_content) if response else None,
        "flow_file": FLOW_FILE.get(flow),
        "intent": INTENT_SEQ.get(flow),  # the seq of its intent entry: it went upstream (None: it never did)
        "stream_cut": json_safe(STREAM_CUT.get(flow)),  # a stream that ended in an error: what the client got
    }


def record_fields(flow, flow_seq: int, request_content: tuple | None = None) -> dict:
    """The fields of a flow's record entry: the digest of everything its record holds, field by field
    (audit/record_digest.py), taken from the flow as the flow recorder takes it for the record, and the seq of
    the flow's entry. request_content: as for flow_fields."""
    return {"flow_id": flow.id, "flow": flow_seq, "record": record_of_flow(flow, request_content)}


def intent_fields(flow) -> dict:
    """The fields of an intent entry: a request about to go upstream (the last request hook), before any outcome."""
    request = flow.request
    return {
        "flow_id": flow.id,
        "identity": json_safe(IDENTITY.get(flow)),
        "method": request.method,
        "host": pretty_host(request),
        "port": request.port,
        "path": request.path.partition("?")[0],
        "request_sha256": sha256_hex(request.raw_content),
    }


_pretty_hosts: dict[str, str] = {}  # host header -> pretty_host: the same few come by on every flow


def pretty_host(request) -> str:
    """request.pretty_host, which parses the Host header (or HTTP/2 authority) anew on every call: remembered
    per header value (pretty_host is the host part of host_header when there is one, else request.host)."""
    authority = request.host_header
    if not authority:
        return request.pretty_host
    host = _pretty_hosts.get(authority)
    if host is None:
        host = request.pretty_host
        if len(_pretty_hosts) < 4096:
            _pretty_hosts[authority] = host
    return host


# Files holding a list of rules with ids: their config entries also carry a digest per rule, so that the
# evidence pack can say which rules an edit added, removed or changed (not only that the file changed).
RULE_LIST_FILES = ("policy.yaml",)


@dataclass
class RulesState:
    """What a config entry says about the rules directory (see config_fields)."""

    digests: dict[str, str] = field(default_factory=dict)  # file -> SHA-256 of its bytes
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> why it could not be read
    rule_digests: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> {rule id: digest}
    setting_digests: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> {top-level key: digest}
    unparsed: dict[str, str] = field(default_factory=dict)  # file -> why its rules could not be read

    def config_fields(self, reason: str, directory: Path) -> dict:
        """The fields of a config entry; built from strings only (not through json_safe, which would drop a
        file named like a credential)."""
        fields: dict = {"reason": reason, "rules_dir": str(directory), "files": self.digests}
        if self.unreadable:
            fields["unreadable"] = self.unreadable  # in the directory but not readable: what the gateway saw, said
        if self.rule_digests:
            fields["rule_digests"] = self.rule_digests
            # Canonical JSON sorts an object's members; the order rules are checked in is kept here.
            fields["rule_order"] = {name: list(rules) for name, rules in self.rule_digests.items()}
        if self.setting_digests:
            fields["setting_digests"] = self.setting_digests
        if self.unparsed:
            fields["rules_unparsed"] = self.unparsed
        return fields


def read_rules_state(directory: Path) -> RulesState:
    """SHA-256 of every file below the rules directory (hidden files, e.g. half-written temporaries, aside),
    what could not be read, with why, and for policy.yaml a digest per rule and per top-level setting, taken
    from the very bytes the file digest is of.

    Rules files change under the gateway (an editor's save, an operator's swap): a file removed between
    listing and reading is simply not in force any more; one that cannot be read is named, not skipped.
    """
    state = RulesState()
    for path in _listing(directory):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        name = relative.as_posix()
        try:
            if not path.is_file():
                continue
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as e:
            state.unreadable[name] = describe(e)
            continue
        state.digests[name] = hashlib.sha256(data).hexdigest()
        if name in RULE_LIST_FILES:
            try:
                state.rule_digests[name], state.setting_digests[name] = rule_list_digests(data, name)
            except ConfigError as e:
                # The policy addon keeps the rules it had; the file's digest says that the file changed.
                state.unparsed[name] = f"line {e.line}: {e.reason}" if e.line else e.reason
            except Exception as e:  # whatever else a hostile file does (a lone surrogate, nesting): said, not fatal
                state.unparsed[name] = f"its rules cannot be digested: {describe(e)}"
    return state


def read_rules_digests(directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    """SHA-256 of every file below the rules directory, and what could not be read (see read_rules_state)."""
    state = read_rules_state(directory)
    return state.digests, state.unreadable


def rules_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every readable file below the rules directory (see read_rules_state)."""
    return read_rules_state(directory).digests


def rule_list_digests(data: bytes, name: str = "policy.yaml") -> tuple[dict[str, str], dict[str, str]]:
    """{rule id: digest} and {top-level setting: digest} of a rules file holding `rules: [{id: ...}, ...]`.

    A digest is the SHA-256 (hex) of the RFC 8785 canonical JSON of the rule (or setting) as YAML reads it,
    with what JSON cannot hold written as text (see _canonical_value): an auditor recomputes it from the
    file with any YAML reader and JCS implementation. A rule without a usable id is named by its position
    ("#3"); a repeated id (an invalid file) by its id and position. Raises ConfigError when the file is not
    YAML holding a mapping, or its `rules` is not a list."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(name, f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    document = RulesFile.parse(text, name).data
    rules = document.get("rules") or []
    if not isinstance(rules, list):
        raise ConfigError(name, "'rules' is not a list")
    by_id: dict[str, str] = {}
    for position, rule in enumerate(rules, 1):
        rule_id = rule.get("id") if isinstance(rule, dict) else None
        key = rule_id if isinstance(rule_id, str) and rule_id else f"#{position}"
        if key in by_id:
            key = f"{key} (#{position})"
        by_id[key] = _digest_of(rule)
    settings = {str(k): _digest_of(v) for k, v in document.items() if k != "rules"}
    return by_id, settings


def _digest_of(value) -> str:
    return hashlib.sha256(jcs(_canonical_value(value))).hexdigest()


def _canonical_value(value):
    """A YAML value as JSON for its digest: floats, dates and integers beyond 2**53 as their text (JCS holds no
    floats here, see chain.jcs), bytes as hex, keys as text, sets as sorted lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -JSON_SAFE_INT <= value <= JSON_SAFE_INT else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_value(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical_value(v) for v in value), key=repr)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def rules_signature(directory: Path) -> tuple:
    """(path, mtime, size) of every file: cheap to take each tick; a change means the digests are due again."""
    signature = []
    for path in _listing(directory):
        try:
            stat = path.stat()
        except OSError:
            continue  # removed meanwhile
        if not path.is_dir():
            signature.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_mode))
    return tuple(signature)


def _listing(directory: Path) -> list[Path]:
    try:
        return sorted(directory.rglob("*")) if directory.is_dir() else []
    except OSError:  # a subdirectory removed while walking: the next tick sees the directory as it is then
        return []
