"""The last check on every WebSocket message, and the session's audit entry at its end.

Each concern governs a session's messages in its own hooks (policy and masking the client's events,
masking and key custody the server's; ``auditgate.websocket.session``). This addon, last in the
bundle, does not trust that they all ran: a message that a concern did not mark as governed (a hook
that silently did nothing, an addon missing, a hook the guard caught failing and killed the flow of)
is dropped, the client gets the error event gateway_internal_error and the session is closed with
1011. Once the session is closed the gateway's own error event is all that still passes.

A server message that stands for other events than itself (masking put a held tail before the event
ending its stream, or left out a delta whose text is all held back: ``auditgate.websocket.session``)
is dropped here and its events are sent in its place with mitmproxy's ``inject.websocket``. Injected
messages reach the client in the order they were injected, after the message whose hook runs; upstream
messages arriving meanwhile are sent the same way behind them, until the gateway's own have passed.

What mitmproxy relays without a hook (close frames, pings and pongs) and the size of every message are
governed from the session's start (``session_control.govern``): close reasons withheld (their digest
recorded), client pings answered by the gateway, upstream pings relayed empty, a message over
``gateway_websocket_max_message_bytes`` refused with 1009.

At the end it writes the ``websocket_session`` audit entry: who, where, how many messages each way
(from the server: those the client got), blocked and masked, the close code, who ended the session
(``ended_by``: client, upstream, gateway, gateway_shutdown), the flow file, and ``messages_sha256`` over
the messages as recorded.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions, http
from mitmproxy import flow as mflow

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
    """Drops (and closes the session on) any WebSocket message that not every concern governed; sends the
    events a server message stands for in its place, in the upstream's order."""

    def __init__(self) -> None:
        self._ended_at_shutdown: set[str] = set()

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_websocket_max_message_bytes", int, session_control.DEFAULT_MAX_MESSAGE_BYTES,
            "Largest WebSocket message in bytes (either direction, as assembled and inflated): a larger one is "
            "never relayed; the client gets the error event gateway_message_too_large and the session is "
            "closed with 1009.")

    def configure(self, updated: set[str]) -> None:
        if "gateway_websocket_max_message_bytes" in updated and ctx.options.gateway_websocket_max_message_bytes < 1:
            raise exceptions.OptionsError("gateway_websocket_max_message_bytes must be at least 1")

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if not session_control.govern(flow, ctx.options.gateway_websocket_max_message_bytes):
            # Its close frames, pings and sizes would pass ungoverned: the session is not opened for use.
            logger.error("WebSocket flow %s: its relay could not be governed: the session is closed", flow.id)
            session_control.fail(flow, "websocket_gate", "the session's relay could not be governed")

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        message = flow.websocket.messages[-1]
        rec = session.record(flow)
        kind = session.own_kind(flow)
        events = session.take_expansion(flow)
        if kind == "error" or (message.dropped and events is None):
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
            return
        if message.from_client or kind is not None:
            return
        if events is None and not rec.get("in_flight"):
            return  # one event for one: it goes on as it is
        # Expanded (a held tail before the event that ends its stream; a delta all held back: nothing), or
        # an upstream event arriving while the gateway's own are on their way: sent by the gateway, in order.
        message.drop()
        try:
            for content in events if events is not None else [message.content]:
                session.note_own(flow, content, session.RESENT)
                session_control.send(flow, True, content)
        except session.TooManyInFlight as error:
            session_control.fail(flow, "websocket_gate", error)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        events = services.audit_events
        rec = session.record(flow)
        if events is None or flow.id in self._ended_at_shutdown:
            return  # a session the gateway ended at its shutdown may see its end again as the process exits
        messages = flow.websocket.messages
        fields = {
            "flow_id": flow.id, "path": flow.request.path.split("?", 1)[0], "endpoint": rec.get("endpoint"),
            "caller": (IDENTITY.get(flow) or {}).get("name"),
            "messages_from_client": sum(1 for m in messages if m.from_client),
            # What the client got: the server events the gateway sent in place of others are counted, not those.
            "messages_from_server": sum(1 for m in messages if not m.from_client and not m.dropped),
            "blocked": rec.get("blocked", 0), "held": rec.get("held", 0), "released": rec.get("released", 0),
            "masked": rec.get("masked", 0), "findings": dict(rec.get("findings", {})),
            "key_echoes": rec.get("key_echoes", 0), "responses": rec.get("responses", 0),
            "close_code": flow.websocket.close_code, "failed": rec.get("failed"),
            "ended_by": _ended_by(flow, rec),
            "flow_file": FLOW_FILE.get(flow), "messages_sha256": messages_sha256(messages),
        }
        if rec.get("close_reason"):
            fields["close_reason"] = dict(rec["close_reason"])  # withheld: who sent it, its SHA-256 and size
        try:
            events.append_event("websocket_session", fields)
            if rec.get("ended_by"):
                # Not noted on the flow: its record and the audit log's flow entry are taken already.
                self._ended_at_shutdown.add(flow.id)
        except AuditUnavailable as e:
            logger.error("the audit log could not take the end of WebSocket flow %s: %s", flow.id, e)


def _ended_by(flow: http.HTTPFlow, rec: dict) -> str:
    """client | upstream | gateway (closed on a failure, 1011/1008) | gateway_shutdown (still open at shutdown)."""
    if rec.get("ended_by"):
        return rec["ended_by"]
    if rec.get("failed") or rec.get("close_code"):
        return "gateway"
    return "client" if flow.websocket.closed_by_client else "upstream"


addons = [WebSocketGate()]
