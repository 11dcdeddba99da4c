"""Sending the gateway's own messages into a WebSocket session and closing it with a code: the one
module of ``auditgate.websocket`` that speaks to mitmproxy.

Messages go through mitmproxy's own ``inject.websocket`` command. Closing with a code has no API:
killing a WebSocket flow only marks it (mitmproxy's WebSocket layer goes on relaying), so the flow's
``WebsocketLayer`` is found under its client connection's handler (``auditgate.transport.
upstream_control.find_stream``) and handed an injected event that it answers exactly as it answers a
close frame: a close frame with the code to both ends, both connections closed, ``websocket_end``.
Injected events are handled in the order they were injected, after the message whose hook is
running: an error event injected first reaches the client before the close.

What mitmproxy relays without any hook is governed here too (``govern``, from websocket_start: the
layer's ``relay_messages`` is replaced on the instance by ``GovernedRelay``, which filters the wsproto
events the layer reads before the layer relays them):

- a close frame's reason (either side) is replaced by ``WITHHELD_REASON`` before it is relayed to the
  other end or recorded; its SHA-256 and length go to the session's record (and its audit entry);
- a client's ping is answered by the gateway with a pong carrying its payload (RFC 6455: the pong echoes
  the ping, so the client's keepalive, which matches payloads, keeps working); the payload goes nowhere
  else. An upstream's ping is relayed to the client with an empty payload, pongs both ways with an empty
  payload: the upstream's liveness check still covers the client, and its payload never reaches it.
  mitmproxy's log line with the payload is left out;
- a message (either side) over the size limit is never assembled nor relayed: the client gets the error
  event gateway_message_too_large, the session is closed with 1009, the record keeps the refused message's
  place (``{"omitted":...}``, dropped) and the session's audit entry the failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque

import wsproto
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
from auditgate.websocket import session

logger = logging.getLogger("auditgate.websocket.session_control")

INTERNAL_ERROR_CLOSE = 1011  # RFC 6455: the server met a condition that prevented it from fulfilling the request
POLICY_VIOLATION_CLOSE = 1008
MESSAGE_TOO_BIG_CLOSE = 1009  # RFC 6455: a message too big for the endpoint to process
WITHHELD_REASON = "reason withheld by the gateway"  # what a peer's non-empty close reason becomes
TOO_LARGE = "gateway_message_too_large"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
_PING_LOG = ("Received WebSocket ping", "Received WebSocket pong")


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
    # GovernedRelay reads wsproto's queue of events (where mitmproxy puts injected messages) ahead of them.
    if not isinstance(getattr(wsproto.Connection(wsproto.ConnectionType.SERVER), "_events", None), deque):
        missing.append("wsproto.Connection._events")
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
    _install(ws_layer, DEFAULT_MAX_MESSAGE_BYTES)  # governed from its start through the bundle; else now
    proxyserver = ctx.master.addons.get("proxyserver")
    proxyserver.inject_event(_CloseInjected(flow, code, reason))
    return True


def govern(flow: http.HTTPFlow, max_message_bytes: int) -> bool:
    """From websocket_start: the session's relay is governed (close reasons, pings, the size limit).
    False when the session's layer could not be found (the caller ends the session)."""
    ws_layer = _layer(flow)
    if ws_layer is None:
        return False
    _install(ws_layer, max_message_bytes)
    return True


def _install(ws_layer: WebsocketLayer, max_message_bytes: int) -> "GovernedRelay":
    relay = ws_layer.__dict__.get("relay_messages")
    if isinstance(relay, GovernedRelay):
        return relay
    relay = GovernedRelay(ws_layer, max_message_bytes)
    # During websocket_start the layer still runs ``start``, which then takes ``self.relay_messages``
    # (this instance attribute) as its handler; a session already relaying is switched over now.
    ws_layer.relay_messages = relay
    if getattr(ws_layer._handle_event, "__func__", None) is WebsocketLayer.relay_messages:
        ws_layer._handle_event = relay
    return relay


class GovernedRelay:
    """Stands in for a WebsocketLayer's ``relay_messages``: the gateway's closes are answered here, and
    every event the layer reads from either connection passes ``_events`` first (see the module doc)."""

    def __init__(self, ws_layer: WebsocketLayer, max_message_bytes: int) -> None:
        self.layer = ws_layer
        self.limit = max_message_bytes
        self._relay = WebsocketLayer.relay_messages.__get__(ws_layer)
        self._pings: list[bytes] = []  # client pings to answer once the layer has read this chunk
        self._size = {True: 0, False: 0}  # bytes of the message in progress, by from_client
        self._discarding = {True: False, False: False}  # the rest of an oversized message is dropped
        for from_client, ws in ((True, ws_layer.client_ws), (False, ws_layer.server_ws)):
            ws.events = self._filter(ws, from_client, ws.events)

    def __call__(self, event):
        if isinstance(event, _CloseInjected):
            return _close_commands(self.layer, event.code, event.reason)
        return self._relayed(event)

    def _relayed(self, event):
        relay = self._relay(event)
        reply = None
        while True:
            try:
                command = relay.send(reply)
            except StopIteration:
                break
            if isinstance(command, commands.Log) and command.message.startswith(_PING_LOG):
                reply = None  # mitmproxy's line holds the payload: never in the gateway's log
                continue
            reply = yield command
        client_ws = self.layer.client_ws
        pings, self._pings = self._pings, []
        for payload in pings:
            if client_ws.state is ConnectionState.OPEN:
                yield client_ws.send2(wsproto.events.Pong(payload=payload))

    def _filter(self, ws, from_client: bool, events):
        def governed_events():
            inner = events()
            while True:
                # wsproto hands out its queue first: mitmproxy puts injected messages there (the gateway's
                # own, governed already), what came over the connection is parsed after it.
                injected = bool(ws._events)
                try:
                    event = next(inner)
                except StopIteration:
                    return
                if isinstance(event, wsproto.events.Message):
                    if injected or self._within_limit(ws, from_client, event):
                        yield event
                elif isinstance(event, wsproto.events.Ping):
                    logger.debug("WebSocket flow %s: a ping from the %s (%d bytes)", self.layer.flow.id,
                                 "client" if from_client else "upstream", len(event.payload))
                    if from_client:
                        self._pings.append(bytes(event.payload))
                    else:
                        yield wsproto.events.Ping(payload=b"")
                elif isinstance(event, wsproto.events.Pong):
                    yield wsproto.events.Pong(payload=b"")
                elif isinstance(event, wsproto.events.CloseConnection):
                    yield self._governed_close(event, from_client)
                else:
                    yield event
        return governed_events

    def _within_limit(self, ws, from_client: bool, event: wsproto.events.Message) -> bool:
        data = event.data
        if self._discarding[from_client]:
            self._discarding[from_client] = not event.message_finished
            return False
        self._size[from_client] += len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        size = self._size[from_client]
        if event.message_finished:
            self._size[from_client] = 0
        if size <= self.limit:
            return True
        # What the layer gathered of this message so far goes too: nothing of it is relayed or hooked.
        ws.frame_buf = [b""]
        self._size[from_client] = 0
        self._discarding[from_client] = not event.message_finished
        refuse_oversized(self.layer.flow, from_client, isinstance(data, str), size, self.limit)
        return False

    def _governed_close(self, event: wsproto.events.CloseConnection, from_client: bool):
        reason = event.reason or ""
        if not reason:
            return event
        raw = reason.encode("utf-8", "surrogatepass")
        session.record(self.layer.flow)["close_reason"] = {
            "from": "client" if from_client else "upstream", "sha256": hashlib.sha256(raw).hexdigest(),
            "bytes": len(raw)}
        return wsproto.events.CloseConnection(code=event.code, reason=WITHHELD_REASON)


def refuse_oversized(flow: http.HTTPFlow, from_client: bool, is_text: bool, size: int, limit: int) -> None:
    """A message over the limit: its place recorded (dropped, without content), the client told with the
    error event gateway_message_too_large, the session closed with 1009 at both ends."""
    from auditgate.websocket.events import error_event

    rec = session.record(flow)
    if rec.get("failed"):
        return
    side = "client" if from_client else "upstream"
    placeholder = websocket.WebSocketMessage(
        Opcode.TEXT if is_text else Opcode.BINARY, from_client,
        json.dumps({"omitted": "over the message size limit", "bytes_at_least": size, "limit": limit}).encode())
    placeholder.drop()
    flow.websocket.messages.append(placeholder)
    rec["failed"] = f"size_limit: a message from the {side} over {limit} bytes"
    rec["close_code"] = MESSAGE_TOO_BIG_CLOSE
    logger.error("WebSocket flow %s: a message from the %s over %d bytes: not relayed, the session is closed "
                 "with %d", flow.id, side, limit, MESSAGE_TOO_BIG_CLOSE)
    content = error_event(TOO_LARGE, f"a WebSocket message from the {side} was larger than the gateway allows "
                                     f"({limit} bytes): it was not passed on and the session is closed")
    try:
        session.note_own(flow, content, "error")
        send(flow, True, content)
    finally:
        close(flow, MESSAGE_TOO_BIG_CLOSE, "message too big")


def _close_commands(ws_layer: WebsocketLayer, code: int, reason: str, closed_by_client: bool = False):
    """What mitmproxy's relay does on a close frame, with the gateway's code and reason."""
    flow = ws_layer.flow
    if flow.websocket is not None:
        flow.websocket.timestamp_end = time.time()
        flow.websocket.closed_by_client = closed_by_client
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
