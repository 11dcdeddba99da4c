"""What one addon leaves on a flow for another: every ``flow.metadata`` key the bundle uses, with its type.

This module is the only place the ``"auditgate.*"`` names are spelled. Values must stay
tnetstring-able (dicts, lists, str, int, float, bool, None): mitmproxy writes the metadata into
flow files, and the offline verifier reads it back without mitmproxy, so nothing here imports it.

    from auditgate.core.flow_contract import IDENTITY
    IDENTITY.set(flow, identity.as_metadata())
    who = IDENTITY.get(flow)            # None when no addon set it

The two things one addon offers another outside a flow (the audit log's event writer, the approval
gate's presence) are registered in ``services`` below, also typed.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypedDict, TypeVar

T = TypeVar("T")


class _HasMetadata(Protocol):
    metadata: MutableMapping[str, Any]


class FlowKey(Generic[T]):
    """One metadata key: its name, the type of its value, who writes it and who reads it."""

    def __init__(self, name: str, writer: str, readers: str) -> None:
        self.name, self.writer, self.readers = name, writer, readers
        ALL_KEYS.append(self)

    def get(self, flow: _HasMetadata) -> T | None:
        return flow.metadata.get(self.name)

    def read(self, metadata: Mapping[str, Any]) -> T | None:
        """The value in a metadata mapping read back from a flow file (no flow object)."""
        return metadata.get(self.name)

    def set(self, flow: _HasMetadata, value: T) -> None:
        flow.metadata[self.name] = value

    def pop(self, flow: _HasMetadata) -> T | None:
        return flow.metadata.pop(self.name, None)

    def on(self, flow: _HasMetadata) -> bool:
        return self.name in flow.metadata

    def __repr__(self) -> str:
        return f"FlowKey({self.name!r})"


ALL_KEYS: list[FlowKey] = []


# ---- the value types ------------------------------------------------------------------------------------
class IdentityRecord(TypedDict, total=False):
    """Who called (never how they proved it): ``Identity.as_metadata()``."""

    name: str
    groups: list[str]
    method: str  # "service_token" or "oidc"
    issuer: str
    subject: str
    email: str
    display_name: str
    jti: str
    token_id: str  # a service token's id (its hash's first 16 hex digits, as listed in identities.yaml)


class AuthFailureRecord(TypedDict, total=False):
    reason: str
    credential: str  # "none", "service_token" or "jwt"
    unverified_claims: dict[str, str]
    source: str  # where the credential came from: authorization, proxy-authorization, connect


class UpstreamRecord(TypedDict):
    host: str
    port: int
    key_source: str  # where the gateway reads the upstream key (env:NAME), never the key


class AuthorizationRecord(TypedDict, total=False):
    decision: str  # allow | deny
    grant: int | None  # the index of the grant that allowed it
    refused: str | None  # what was refused: groups, endpoint_path, upstream, endpoint or model
    reason: str


class PolicyRecord(TypedDict, total=False):
    rule: str  # "default" when no rule matched
    action: str  # allow | block | log | require_approval
    policy: str  # digest of the policy file that decided
    matched: dict[str, Any]
    message: str
    approvers: list[str]
    timeout_s: float
    reuse_s: float
    eval_us: int


class ApprovalRecord(TypedDict, total=False):
    id: str
    rule: str
    requester: str | None
    how: str  # created | attached | reused
    requested_at: float
    status: str
    decided_by: str | None
    decided_at: float | None
    reason: str | None
    refusals: list[dict]
    waited_s: float


class MaskingRecord(TypedDict, total=False):
    status: str  # clean | masked | failed
    findings: list[dict]  # {entity_type, count, path, direction}: never the value
    reason: str  # why masking failed
    stream_ms: float  # time spent masking a streamed reply


class RefusalRecord(TypedDict):
    status: int
    code: str
    message: str


class BodyLimitsRecord(TypedDict, total=False):
    """Sizes seen by body_limits: never content."""
    request_bytes: int  # as received (compressed if it was)
    request_inflated_bytes: int  # after inflating a compressed request
    response_bytes: int
    response_inflated_bytes: int
    limit_bytes: int  # the limit that refused the flow, when one did


class TunnelRecord(TypedDict, total=False):
    """A CONNECT tunnel the gateway relays without reading (a pass-through host): who, where, how much."""
    caller: str | None
    host: str
    port: int
    bytes_up: int
    bytes_down: int
    duration_ms: int
    refused: str  # why the tunnel was refused, when it was


class GuardRecord(TypedDict, total=False):
    """An unexpected exception in one of the bundle's hooks, and what the guard did about it."""
    addon: str
    hook: str
    error: str  # the exception's type name: never its message, which may quote request data
    action: str  # refused | pending (a failed responseheaders, refused at the response) | stream_ended | killed | logged
    also: list[dict]  # further failures on the same flow, in order


# ---- the keys, in the order a request meets their writers -------------------------------------------------
PASSTHROUGH: FlowKey[bool] = FlowKey(
    "auditgate.passthrough", "upstream_routing (forward-mode CONNECT to a pass-through host)",
    "tunnels (a pass-through CONNECT needs an authenticated caller and an audit entry)")
UPSTREAM: FlowKey[UpstreamRecord] = FlowKey(
    "auditgate.upstream", "upstream_routing", "authorization, policy, approval, audit_log")
REMOVED_IDENTITY_HEADERS: FlowKey[list[str]] = FlowKey(
    "auditgate.removed_identity_headers", "caller_auth", "records")
AUTH_FAILURE: FlowKey[AuthFailureRecord] = FlowKey("auditgate.auth_failure", "caller_auth", "records, evidence")
IDENTITY: FlowKey[IdentityRecord] = FlowKey(
    "auditgate.identity", "caller_auth", "authorization, policy, approval, audit_log, evidence")
AUTHORIZATION: FlowKey[AuthorizationRecord] = FlowKey("auditgate.authorization", "authorization", "records")
POLICY: FlowKey[PolicyRecord] = FlowKey("auditgate.policy", "policy", "approval, audit_log, evidence")
APPROVAL: FlowKey[ApprovalRecord] = FlowKey("auditgate.approval", "approval", "overhead, audit_log, evidence")
MASKING: FlowKey[MaskingRecord] = FlowKey("auditgate.masking", "masking", "audit_log, evidence")
KEY_HEADER: FlowKey[str] = FlowKey(
    "auditgate.key_header", "key_custody (while the request is in flight)", "key_custody (removed once sent)")
REQUEST_READY: FlowKey[float] = FlowKey(
    "auditgate.request_ready", "overhead (last request hook)", "overhead (removed at the response)")
OVERHEAD_MS: FlowKey[float] = FlowKey("auditgate.overhead_ms", "overhead", "records")
REFUSAL: FlowKey[RefusalRecord] = FlowKey(
    "auditgate.refusal", "any addon, through auditgate.core.refusal.refuse", "masking, audit_log, verify, evidence")
FLOW_FILE: FlowKey[str] = FlowKey("auditgate.flow_file", "flow_recorder", "audit_log")
BODY_LIMITS: FlowKey[BodyLimitsRecord] = FlowKey("auditgate.body_limits", "body_limits", "audit_log, records")
TUNNEL: FlowKey[TunnelRecord] = FlowKey("auditgate.tunnel", "tunnels", "audit_log, evidence")
GUARD: FlowKey[GuardRecord] = FlowKey(
    "auditgate.guard", "the hook guard (auditgate.core.guard), for any addon of the bundle", "audit_log, evidence")
INSTANCE: FlowKey[str] = FlowKey(
    "auditgate.instance", "audit_log (the gateway_instance that served the flow)", "approval, verify, evidence")

# ---- WebSocket sessions (issue 13) -------------------------------------------------------------------------------
class WebSocketRecord(TypedDict, total=False):
    """A WebSocket session's governance, message by message: counts and digests, never content."""
    endpoint: str  # responses | realtime
    governed: dict[str, int]  # concern (policy, masking, key_custody) → how many messages it had governed
    own: dict[str, list]  # sha256 of a message the gateway injected, not yet seen again → [kind, how many]
    # kind: "error" | "release" | "resent" (a governed server event the gateway sends in place of the upstream's)
    in_flight: int  # resent events injected and not yet seen again: upstream events meanwhile are resent behind
    expand: list  # [message count, [event, ...]]: what the latest server message stands for (taken by websocket_gate)
    ended_by: str  # "gateway_shutdown": the session was still open when the gateway stopped (closed 1001)
    recorded: bool  # flow_recorder recorded the session (at its end)
    blocked: int  # client events dropped by policy (block, approval denied/expired/unavailable)
    held: int  # client events held for approval
    released: int  # held client events sent on after a granted approval
    masked: int  # server events in which masking found personal data (client events masking changed)
    findings: dict[str, int]  # entity type → count, both directions
    key_echoes: int  # echoes of the upstream key taken out of server messages
    responses: int  # finished model responses
    failed: str  # why the gateway closed the session (1011): the concern and the error's type, never content
    close_code: int  # the close code the gateway sent, when it closed the session
    current_own: list  # [message count, "error" | "release" | None]: the latest message, once recognised
    audio_from: int  # messages before this one have their audio digested for the record (flow_recorder)
    close_reason: dict  # a peer's close reason, withheld: {from: client|upstream, sha256, bytes} (never the text)


WEBSOCKET: FlowKey[WebSocketRecord] = FlowKey(
    "auditgate.websocket", "policy, masking, key_custody, websocket_gate (a WebSocket session's messages)",
    "websocket_gate, flow_recorder, audit_log, evidence")

# ---- whole-flow evidence (issue 14) ------------------------------------------------------------------------------
INTENT_SEQ: FlowKey[int] = FlowKey(
    "auditgate.intent_seq", "audit_log (the seq of the flow's intent entry, written before it went upstream)",
    "audit_log (the outcome entry names it), verify")
STREAM_CUT: FlowKey[dict] = FlowKey(
    "auditgate.stream_cut", "sse_streaming: {reason, bytes_to_client} of a stream that ended in an error",
    "audit_log, verify, evidence")


# ---- services one addon offers another, outside any flow ------------------------------------------------------
class AuditEvents(Protocol):
    """Appends a non-flow entry (an approval decision) to the audit log; raises AuditUnavailable. Told when the
    flow recorder takes a flow's record, it writes that record's digest entry (never raises)."""

    unavailable: str | None  # why the log cannot take entries now, or None

    def append_event(self, kind: str, fields: dict) -> dict: ...

    def record_taken(self, flow: Any) -> None: ...


class FlowRecords(Protocol):
    """Which flows' records are still on their way to their files (the flow_recorder addon)."""

    def unsettled(self, flow_id: str) -> bool: ...


class AuditUnavailable(RuntimeError):
    """The audit log cannot take an entry; whoever asked must refuse what it was about to allow."""


@dataclass
class BundleServices:
    """Set by the addon that offers a service while it is loaded, cleared when it is unloaded."""

    audit_events: AuditEvents | None = None  # the audit_log addon
    flow_records: FlowRecords | None = None  # the flow_recorder addon: the audit log's checkpoints ask it
    approval_gate: object | None = None  # the approval addon: policy refuses require_approval without it
    minted_identity: str | None = None  # caller_auth made this identity at first start (its token is on the console)

    def reset(self) -> None:
        """Forget every service (a test harness between two bundles in one process)."""
        self.__init__()


services = BundleServices()
