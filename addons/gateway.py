"""The auditgate bundle: every addon, listed in the order a request passes through them."""

from addons.approval import ApprovalGate
from addons.audit_log import AuditLog
from addons.authorization import GroupAuthorization
from addons.caller_auth import CallerAuth
from addons.caller_setup_hint import CallerSetupHint
from addons.flow_recorder import FlowRecorder
from addons.key_custody import KeyCustody
from addons.masking import PiiMasking
from addons.overhead import OverheadHeader
from addons.policy import PolicyRules
from addons.sse_streaming import SseStreaming
from addons.transport_errors import OpenAIShapedTransportErrors
from addons.upstream_routing import UpstreamRouting

# mitmproxy calls each hook on these in list order. A request hook that answers a flow (a refusal)
# leaves the later request hooks nothing to do; the response side then runs as usual.
addons = [
    OpenAIShapedTransportErrors(),  # upstream down → OpenAI-shaped 502, not mitmproxy's HTML page
    UpstreamRouting(),  # 1. which upstream? any other host → 403 (never an open relay)
    CallerAuth(),  # 2. who is calling? no valid token → 401; the caller's credentials are removed
    GroupAuthorization(),  # 2b. may the caller's groups use this upstream, endpoint and model? → 403 otherwise
    PolicyRules(),  # 2c. policy.yaml on the prompt as sent: allow, block (403 gateway_blocked), log, or approval
    ApprovalGate(),  # 2d. held until a second person approves (admin listener 127.0.0.1:8181), else 403
    PiiMasking(),  # 3. personal data masked: prompts if configured; replies, streams included
    KeyCustody(),  # 4. the gateway's own upstream key goes on, and comes off again once sent
    SseStreaming(),  # response: event streams pass through as they arrive (masked ones by PiiMasking)
    OverheadHeader(),  # last to change the flow: the gateway's own time, in x-gateway-overhead-ms
    FlowRecorder(),  # what the client saw, credentials scrubbed, into <records>/flows/*.mitm
    AuditLog(),  # one hash-chained entry per recorded flow, written before the reply ends; 503 if it cannot
    CallerSetupHint(),  # at start: what callers export
]
