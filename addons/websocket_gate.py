"""The last check on every WebSocket message, and the session's audit entry at its end.

Each concern governs a session's messages in its own hooks (policy and masking the client's events,
masking and key custody the server's; ``auditgate.websocket.session``). This addon, last in the
bundle, does not trust that they all ran: a message that a concern did not mark as governed (a hook
that silently did nothing, an addon missing, a hook the guard caught failing and killed the flow of)
is dropped, the client gets the error event gateway_internal_error and the session is closed with
1011. Once the session is closed the gateway's own error event is all that still passes. At the end
it writes the ``websocket_session`` audit entry: who, where, how many messages each way, blocked and
masked, the close code, the flow file, and ``messages_sha256`` over the messages as recorded.
"""

from __future__ import annotations

import logging

from mitmproxy import flow as mflow
from mitmproxy import http

from auditgate.core.flow_contract import (
    FLOW_FILE,
    GUARD,
    IDENTITY,
    AuditUnavailable,
    services,
)
from auditgate.websocket import session, session_control
from auditgate.websocket.records import messages_sha256

logger = logging.getLogger("auditgate.addons.websocket_gate")


def _hook_failed(flow: http.HTTPFlow) -> str | None:
    """Why the guard stepped in on this session's hooks, if it did."""
    if flow.error is not None and flow.error.msg == mflow.Error.KILLED_MESSAGE:
        return "the flow was killed"
    guard = GUARD.get(flow)
    for record in [guard, *(guard or {}).get("also", [])] if guard else []:
        if str(record.get("hook", "")).startswith("websocket_"):
            return f"{record.get('addon')}.{record.get('hook')} failed"
    return None


class WebSocketGate:
    """Drops (and closes the session on) any WebSocket message that not every concern governed."""

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        message = flow.websocket.messages[-1]
        rec = session.record(flow)
        if session.own_kind(flow) == "error" or message.dropped:
            return  # the gateway's own error event; or a message that is not passed on anyway
        if rec.get("failed"):
            message.drop()  # the session is closing: nothing more passes
            return
        why = _hook_failed(flow)
        missing = session.missing(flow, message.from_client)
        if why or missing:
            reason = why or f"not governed by {', '.join(missing)}"
            logger.error("a WebSocket message of flow %s reached the last check, but %s: dropped", flow.id, reason)
            session_control.fail(flow, "websocket_gate", reason)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        events = services.audit_events
        if events is None:
            return
        rec = session.record(flow)
        messages = flow.websocket.messages
        fields = {
            "flow_id": flow.id, "path": flow.request.path.split("?", 1)[0], "endpoint": rec.get("endpoint"),
            "caller": (IDENTITY.get(flow) or {}).get("name"),
            "messages_from_client": sum(1 for m in messages if m.from_client),
            "messages_from_server": sum(1 for m in messages if not m.from_client),
            "blocked": rec.get("blocked", 0), "held": rec.get("held", 0), "released": rec.get("released", 0),
            "masked": rec.get("masked", 0), "findings": dict(rec.get("findings", {})),
            "key_echoes": rec.get("key_echoes", 0), "responses": rec.get("responses", 0),
            "close_code": flow.websocket.close_code, "failed": rec.get("failed"),
            "flow_file": FLOW_FILE.get(flow), "messages_sha256": messages_sha256(messages),
        }
        try:
            events.append_event("websocket_session", fields)
        except AuditUnavailable as e:
            logger.error("the audit log could not take the end of WebSocket flow %s: %s", flow.id, e)


addons = [WebSocketGate()]
