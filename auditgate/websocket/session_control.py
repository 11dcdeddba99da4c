"""Sending the gateway's own messages into a WebSocket session and closing it with a code: the one
module of ``auditgate.websocket`` that speaks to mitmproxy.

Messages go through mitmproxy's own ``inject.websocket`` command. Closing with a code has no API:
killing a WebSocket flow only marks it (mitmproxy's WebSocket layer goes on relaying), so the flow's
``WebsocketLayer`` is found under its client connection's handler (``auditgate.transport.
upstream_control.find_stream``) and handed an injected event that it answers exactly as it answers a
close frame: a close frame with the code to both ends, both connections closed, ``websocket_end``.
Injected events are handled in the order they were injected, after the message whose hook is
running: an error event injected first reaches the client before the close.
"""

from __future__ import annotations

import asyncio
import logging
import time

import wsproto.events
from mitmproxy import ctx, http, websocket
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.websocket import (
    WebsocketEndHook,
    WebsocketLayer,
    WebSocketMessageInjected,
)
from wsproto import ConnectionState
from wsproto.frame_protocol import Opcode

from auditgate.transport import upstream_control

logger = logging.getLogger("auditgate.websocket.session_control")

INTERNAL_ERROR_CLOSE = 1011  # RFC 6455: the server met a condition that prevented it from fulfilling the request
POLICY_VIOLATION_CLOSE = 1008


class _CloseInjected(WebSocketMessageInjected):
    """Routed by mitmproxy like an injected message (to the flow's stream), answered by ``_closing``."""

    def __init__(self, flow: http.HTTPFlow, code: int, reason: str) -> None:
        super().__init__(flow, websocket.WebSocketMessage(Opcode.TEXT, False, b"", injected=True))
        self.code, self.reason = code, reason


def missing_internals() -> list[str]:
    missing = upstream_control.missing_internals()
    for name in ("client_ws", "server_ws", "done", "relay_messages"):
        if name not in getattr(WebsocketLayer, "__annotations__", {}) and not hasattr(WebsocketLayer, name):
            missing.append(f"WebsocketLayer.{name}")
    return missing


def send(flow: http.HTTPFlow, to_client: bool, content: bytes) -> None:
    """Send a text message to one end of the session (it passes the websocket_message hooks again)."""
    ctx.master.commands.call("inject.websocket", flow, to_client, content, True)


def _layer(flow: http.HTTPFlow) -> WebsocketLayer | None:
    found = upstream_control.find_stream(flow)
    if found is None:
        return None
    child = found[0].child_layer
    return child if isinstance(child, WebsocketLayer) else None


def close(flow: http.HTTPFlow, code: int = INTERNAL_ERROR_CLOSE, reason: str = "gateway error") -> bool:
    """Close the session with ``code`` at both ends, after whatever was injected before. True when
    the close was queued; False when the session could not be reached (its connections are then cut)."""
    ws_layer = _layer(flow)
    if ws_layer is None:
        logger.warning("WebSocket flow %s could not be closed with %d: its connections are cut", flow.id, code)
        upstream_control.close_upstream(flow)
        upstream_control.close_client(flow)
        if flow.killable:
            flow.kill()
        return False
    relay = ws_layer._handle_event

    def closing(event):
        if not isinstance(event, _CloseInjected):
            return relay(event)
        return _close_commands(ws_layer, event.code, event.reason)

    if getattr(relay, "__func__", None) is WebsocketLayer.relay_messages:
        ws_layer._handle_event = closing
    proxyserver = ctx.master.addons.get("proxyserver")
    proxyserver.inject_event(_CloseInjected(flow, code, reason))
    return True


def _close_commands(ws_layer: WebsocketLayer, code: int, reason: str):
    flow = ws_layer.flow
    if flow.websocket is not None:
        flow.websocket.timestamp_end = time.time()
        flow.websocket.closed_by_client = False
        flow.websocket.close_code = code
        flow.websocket.close_reason = reason
    close = wsproto.events.CloseConnection(code=code, reason=reason)
    for ws in (ws_layer.server_ws, ws_layer.client_ws):
        if ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            yield ws.send2(close)
        yield commands.CloseConnection(ws.conn)
    yield WebsocketEndHook(flow)
    flow.live = False
    ws_layer._handle_event = ws_layer.done


INTERNAL_ERROR = "gateway_internal_error"


def fail(flow: http.HTTPFlow, concern: str, error: BaseException | str) -> None:
    """A failure on the latest message: it is dropped (never passed raw), the client gets the error event
    gateway_internal_error, and the session is closed with 1011. Later messages are dropped by the gate."""
    from auditgate.websocket import session
    from auditgate.websocket.events import error_event

    messages = flow.websocket.messages if flow.websocket is not None else []
    if messages and not messages[-1].dropped:
        messages[-1].drop()
    rec = session.record(flow)
    why = error if isinstance(error, str) else type(error).__name__
    logger.error("WebSocket flow %s: %s failed on a message (%s): the session is closed with %d", flow.id, concern,
                 why, INTERNAL_ERROR_CLOSE)
    if rec.get("failed"):
        return
    rec["failed"] = f"{concern}: {why}"
    rec["close_code"] = INTERNAL_ERROR_CLOSE
    content = error_event(INTERNAL_ERROR, "the gateway could not complete its checks on a message of this "
                                          "session, so it was not passed on and the session is closed",
                          "server_error")
    try:
        session.note_own(flow, content, "error")
        send(flow, True, content)
    finally:
        close(flow, INTERNAL_ERROR_CLOSE, "gateway error")


def refuse_event(flow: http.HTTPFlow, code: str, message: str) -> None:
    """Drop the latest client event (if still undecided) and answer it with the API's error event; the session goes on."""

    messages = flow.websocket.messages if flow.websocket is not None else []
    if messages and messages[-1].from_client and not messages[-1].dropped:
        messages[-1].drop()
    answer_error(flow, code, message)


def answer_error(flow: http.HTTPFlow, code: str, message: str) -> None:
    """Send the client the API's error event (outside any message's hook too: an approval's outcome)."""
    from auditgate.websocket import session
    from auditgate.websocket.events import error_event

    content = error_event(code, message)
    session.note_own(flow, content, "error")
    send(flow, True, content)


GOING_AWAY_CLOSE = 1001  # RFC 6455: an endpoint is going away (a server going down)
SHUTDOWN_REASON = "gateway shutting down"


async def end_at_shutdown(flows: list[http.HTTPFlow], timeout: float) -> list[http.HTTPFlow]:
    """End the sessions still open when the gateway stops, so each ends the way any session ends.

    mitmproxy does not end open WebSocket sessions at shutdown: the process exits with them open, and no
    ``websocket_end`` hook runs for them. Each is closed here with 1001 at both ends, which runs every
    addon's ``websocket_end`` (the flow file, the audit log's entries) while the addons can still write.
    Waits until they all ended (mitmproxy sets ``flow.live`` to False once the hooks returned); any session
    still open after ``timeout`` has its hooks run directly. Returns the ones ended directly."""
    live = [f for f in flows if f.live and f.websocket is not None and f.websocket.timestamp_end is None]
    for flow in live:
        try:
            close(flow, GOING_AWAY_CLOSE, SHUTDOWN_REASON)
        except Exception as error:  # its hooks are run below
            logger.error("WebSocket flow %s could not be closed at shutdown: %s", flow.id, type(error).__name__)
    deadline = time.monotonic() + timeout
    while any(f.live for f in live) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    stuck = [f for f in live if f.live]
    for flow in stuck:
        logger.warning("WebSocket flow %s did not end at shutdown within %gs: its end is recorded now", flow.id,
                       timeout)
        if flow.websocket.timestamp_end is None:
            flow.websocket.timestamp_end = time.time()
            flow.websocket.closed_by_client = False
            flow.websocket.close_code = GOING_AWAY_CLOSE
            flow.websocket.close_reason = SHUTDOWN_REASON
        await ctx.master.addons.handle_lifecycle(WebsocketEndHook(flow))
        flow.live = False
    return stuck
