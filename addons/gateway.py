"""The auditgate bundle: every addon module, listed in the order a request passes through them.

Run it with ``mitmdump -s addons/gateway.py`` (``./run_gateway.sh`` does). Each module below is one
concern and also loads alone (``mitmdump -s addons/NAME.py``); the logic lives in ``auditgate.*``.
"""

from auditgate.core.addon_files import bundle

# mitmproxy calls each hook on these in list order. A request hook that answers a flow (a refusal)
# leaves the later request hooks nothing to do; the response side then runs as usual.
addons = bundle(__file__, [
    "transport_errors",  # upstream down → OpenAI-shaped 502; upstream too slow → 504 (not mitmproxy's HTML page)
    "upstream_routing",  # 1. which upstream? any other host → 403 (never an open relay)
    "tunnels",  # CONNECT tunnels not read by the gateway: an authenticated caller and an audit entry, or refused
    "caller_auth",  # 2. who is calling? no valid token → 401; the caller's credentials are removed
    "body_limits",  # bodies within their size limits, inflated off the event loop; else 413
    "authorization",  # 3. may the caller's groups use this upstream, endpoint and model? → 403 otherwise
    "policy",  # 4. policy.yaml on the prompt as sent: allow, block (403 gateway_blocked), log, or approval
    "approval",  # 5. held until a second person approves (admin listener 127.0.0.1:8181), else 403
    "masking",  # 6. personal data masked: prompts if configured; replies, streams included
    "request_gate",  # last check before the key goes on: an identity, and any approval required granted
    "key_custody",  # 7. the gateway's own upstream key goes on, and comes off again once sent
    "sse_streaming",  # response: event streams pass through as they arrive (masked ones by masking)
    "overhead",  # last to change the flow: the gateway's own time, in x-gateway-overhead-ms
    "flow_recorder",  # what the client saw, credentials scrubbed, into <records>/flows/*.mitm
    "audit_log",  # one hash-chained entry per recorded flow, written before the reply ends; 503 if it cannot
    "audit_witness",  # each signed checkpoint also to a witness outside the records; 503 while none takes them
    "caller_setup_hint",  # at start: what callers export (and where the first-start token is)
    "websocket_gate",  # last on every WebSocket message: dropped (session closed 1011) unless every concern governed it
])
