"""The last request guard: a request goes on only with a route, a caller, and any approval it needs granted.

Each earlier addon refuses what it finds wrong; this one does not trust that they all ran. A hook that
silently did nothing (a bug, an addon unloaded, a hook replaced) would otherwise let a request through
unchecked. It runs just before key custody puts the upstream key on, and checks what the request
path must have left on the flow (``auditgate.core.flow_contract``): the upstream route, the
authenticated identity, a policy decision that is not a block, and — when the policy asked for
approval — an approval granted for it. A WebSocket upgrade goes on only to the endpoints whose messages the bundle
governs (the Responses API's WebSocket mode, the Realtime API: ``auditgate.websocket.events.endpoint_of``);
any other is refused with 501, never relayed ungoverned, and so is every upgrade when the mitmproxy it runs
on lacks the internals through which the gateway governs a session (checked at start).
"""

from __future__ import annotations

import logging

from mitmproxy import http

from auditgate.core.flow_contract import APPROVAL, IDENTITY, POLICY, UPSTREAM
from auditgate.core.refusal import is_answered, refuse
from auditgate.websocket import session, session_control
from auditgate.websocket.events import endpoint_of

logger = logging.getLogger("auditgate.addons.request_gate")

GRANTED = ("approved", "reused")


def is_websocket_upgrade(request: http.Request) -> bool:
    return "websocket" in request.headers.get("upgrade", "").lower()


def missing_check(flow: http.HTTPFlow) -> str | None:
    """What the request path failed to establish for this flow, or None when it may go on."""
    if not UPSTREAM.get(flow):
        return "no upstream route was decided for it"
    if not IDENTITY.get(flow):
        return "it has no authenticated caller"
    policy = POLICY.get(flow)
    if not policy:
        return "no policy decision was made for it"
    if policy.get("action") == "require_approval" and (APPROVAL.get(flow) or {}).get("status") not in GRANTED:
        return f"policy rule {policy.get('rule')!r} requires an approval, and none was granted"
    if policy.get("action") == "block":
        return f"policy rule {policy.get('rule')!r} blocks it"
    return None


class RequestGate:
    """Refuses (500 gateway_internal_error) a request the earlier addons should have refused and did not."""

    def __init__(self) -> None:
        # The mitmproxy internals through which the gateway governs a WebSocket relay (close codes, pings,
        # message sizes, injected events) that this mitmproxy lacks: checked once, at start.
        self.websocket_internals_missing: list[str] | None = None

    def running(self) -> None:
        self.websocket_internals_missing = session_control.missing_internals()
        if self.websocket_internals_missing:  # a warning: an error logged at start stops mitmdump (errorcheck)
            logger.warning("WebSocket upgrades will be refused (501): this mitmproxy lacks internals the gateway "
                         "governs WebSocket sessions through: %s", ", ".join(self.websocket_internals_missing))

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        if is_websocket_upgrade(flow.request) and self._websocket_ungovernable():
            refuse(flow, 501, "gateway_websocket_unsupported",
                   "this gateway cannot govern WebSocket sessions with the mitmproxy it runs on; "
                   "use the HTTP transport")
            return
        if is_websocket_upgrade(flow.request) and endpoint_of(flow.request.path) is None:
            # Policy, masking and the records read the events of the Responses API's WebSocket mode and
            # of the Realtime API; messages of any other WebSocket would pass unread: refused.
            refuse(flow, 501, "gateway_websocket_unsupported",
                   "this gateway governs WebSocket sessions only at /v1/responses and /v1/realtime; "
                   "use the HTTP transport for this endpoint")
            return
        if is_websocket_upgrade(flow.request):
            # No permessage-deflate: mitmproxy inflates a compressed frame whole before any hook or the
            # message size limit sees it, so one small frame could inflate to gigabytes in the proxy.
            # Without the offer the upstream answers uncompressed, and so does mitmproxy to the client.
            flow.request.headers.pop("Sec-WebSocket-Extensions", None)
        missing = missing_check(flow)
        if missing:
            logger.error("request %s %s reached the last check unrefused, but %s: refused", flow.request.method,
                         flow.request.path.partition("?")[0], missing)
            refuse(flow, 500, "gateway_internal_error",
                   f"the gateway could not complete its checks on this request ({missing}), so it was not sent")

    def _websocket_ungovernable(self) -> bool:
        if self.websocket_internals_missing is None:  # loaded without `running` (a test harness): checked now
            self.websocket_internals_missing = session_control.missing_internals()
        return bool(self.websocket_internals_missing)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        # A session whose upgrade did not pass every check (a hook that silently did nothing; an upgrade
        # some other way opened) is closed before a message passes.
        endpoint = endpoint_of(flow.request.path)
        missing = "it is not a governed WebSocket endpoint" if endpoint is None else missing_check(flow)
        session.record(flow)["endpoint"] = endpoint or "other"
        if missing:
            logger.error("a WebSocket session to %s started unchecked (%s): closed", flow.request.pretty_host, missing)
            session.record(flow)["failed"] = f"request_gate: {missing}"
            session_control.close(flow, session_control.POLICY_VIOLATION_CLOSE, "not governed")


addons = [RequestGate()]
