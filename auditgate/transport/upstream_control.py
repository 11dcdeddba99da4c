"""Ending a flow whose upstream timed out with the gateway's own answer: the one module that reaches into
mitmproxy's proxy internals.

mitmproxy has no upstream timeouts, and no API to answer a flow that waits on its upstream: an addon's
hooks run when something happens, and a silent upstream makes nothing happen. What is used here
(``missing_internals()`` checks it at start, and the gateway refuses to start without it):

- the ``proxyserver`` addon's ``connections``: each client connection's handler, with ``transports``
  (each connection → the asyncio task that reads it: cancelling it closes the connection),
  ``timeout_watchdog.last_activity`` (the time of the connection's latest event) and ``server_event``
  (how mitmproxy's own ``inject_event`` feeds an event in);
- the layer tree under a handler (``NextLayer.layer``, ``child_layer``, ``HttpLayer.streams``, the
  bound ``_handle_event`` the proxy-mode layers hand events to), to
  find the flow's ``HttpStream``, its stream id, and whether it runs inside a CONNECT tunnel;
- events that are both a ``MessageInjected`` (which mitmproxy routes to the flow's HTTP stream, past
  the TLS layers, as it does for injected WebSocket messages) and a reply event. Outside a tunnel:
  ``ResponseHeaders``, ``ResponseData``, ``ResponseEndOfMessage``, which the stream takes as the end
  of the upstream's reply, so the gateway's answer runs through every response hook (masked,
  recorded, audited). Inside a CONNECT tunnel the tunnel's own stream would turn reply data into raw
  bytes for the TLS layer, so there the event is a ``ResponseProtocolError``: the flow fails with the
  timeout's message (the error hooks record it) and mitmproxy's error page answers, which
  transport_errors makes a 504 JSON error.

The HTTP/1 client layer routes injected events by the flow's server connection; an HTTP/2 or HTTP/3
upstream connection carries several streams and cannot be addressed that way, so there the upstream
connection is only closed, and mitmproxy's own error page (JSON, by transport_errors) answers.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http
from mitmproxy.proxy import events, layer, server
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpLayer,
    HttpStream,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)

logger = logging.getLogger("auditgate.transport")


class _InjectedResponseHeaders(ResponseHeaders, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow, response: http.Response) -> None:
        # The stream makes its own events (with its own stream id) from these; stream_id is not read.
        self.flow, self.message, self.stream_id = flow, None, 0
        self.response, self.end_stream = response, False


class _InjectedResponseData(ResponseData, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow, data: bytes) -> None:
        self.flow, self.message, self.stream_id, self.data = flow, None, 0, data


class _InjectedResponseEnd(ResponseEndOfMessage, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow) -> None:
        self.flow, self.message, self.stream_id = flow, None, 0


class _InjectedFailure(ResponseProtocolError, events.MessageInjected):
    def __init__(self, flow: http.HTTPFlow, stream_id: int, message: str) -> None:
        # The stream hands this very event on to the client's connection, which checks its stream id.
        self.flow, self.stream_id, self.message, self.code = flow, stream_id, message, ErrorCode.GENERIC_SERVER_ERROR


def missing_internals() -> list[str]:
    """What this module needs of mitmproxy and this mitmproxy lacks (empty: all there)."""
    missing = []
    handler_fields = getattr(server.ConnectionHandler, "__annotations__", {})
    for name in ("transports", "timeout_watchdog"):
        if name not in handler_fields:
            missing.append(f"ConnectionHandler.{name}")
    if not callable(getattr(server.ConnectionHandler, "server_event", None)):
        missing.append("ConnectionHandler.server_event")
    if "last_activity" not in getattr(server.TimeoutWatchdog, "__annotations__", {}):
        missing.append("TimeoutWatchdog.last_activity")
    proxyserver = _proxyserver()
    if proxyserver is not None and not isinstance(getattr(proxyserver, "connections", None), dict):
        missing.append("the proxyserver addon's connections")
    return missing


def _proxyserver():
    try:
        return ctx.master.addons.get("proxyserver")
    except AttributeError:  # no master (a bare test harness)
        return None


def _handler(client) -> server.ConnectionHandler | None:
    proxyserver = _proxyserver()
    connections = getattr(proxyserver, "connections", None) or {}
    return connections.get(client.id)


def last_activity(client) -> float | None:
    """When anything last happened on this client's connection (its own or its upstream's bytes)."""
    handler = _handler(client)
    return handler.timeout_watchdog.last_activity if handler is not None else None


def _cancel(client, connection, message: str) -> bool:
    """Cancel the task that serves one of a client handler's connections; False when there is none."""
    handler = _handler(client)
    io = handler.transports.get(connection) if handler is not None else None
    if io is None or io.handler is None or io.handler.done():
        return False
    io.handler.cancel(message)
    return True


def cancel_connect(client, server_conn, message: str) -> bool:
    """Abandon a TCP connect in progress; ``message`` becomes the connection error the flow reports."""
    return _cancel(client, server_conn, message)


def close_upstream(flow: http.HTTPFlow) -> bool:
    """Close the flow's upstream connection (the reply in progress on it fails)."""
    return _cancel(flow.client_conn, flow.server_conn, "auditgate: upstream timed out")


def close_client(flow: http.HTTPFlow) -> bool:
    """Close the flow's client connection: the last resort when a flow could not be ended any other way."""
    return _cancel(flow.client_conn, flow.client_conn, "auditgate: upstream timed out")


def find_stream(flow: http.HTTPFlow) -> tuple[HttpStream, bool] | None:
    """The flow's HTTP stream, and whether it runs inside a CONNECT tunnel; None when the flow is not live.

    Only for a live HTTP/1 upstream connection: injected events reach a stream through it.
    """
    handler = _handler(flow.client_conn)
    if handler is None or flow.server_conn not in handler.transports or flow.server_conn.alpn in (b"h2", b"h3"):
        return None
    pending: list[tuple[layer.Layer, bool]] = [(handler.layer, False)]
    seen: set[int] = set()
    while pending:
        current, tunneled = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, HttpStream):
            if current.flow is flow:
                return current, tunneled
            if current.child_layer is not None:  # a CONNECT (or upgrade) stream: what runs inside it
                pending.append((current.child_layer, True))
            continue
        if isinstance(current, HttpLayer):
            pending.extend((stream, tunneled) for stream in current.streams.values())
        # NextLayer.layer, most layers' child_layer; the proxy-mode layers keep their child only as the
        # bound method they hand events to (_handle_event), NextLayer as _handle.
        for name in ("layer", "child_layer", "_handle_event", "_handle"):
            child = getattr(current, name, None)
            child = getattr(child, "__self__", child)
            if isinstance(child, layer.Layer) and child is not current:
                pending.append((child, tunneled))
    return None


async def fail_reply(flow: http.HTTPFlow, stream_id: int, message: str) -> None:
    """Fail the flow's reply with ``message`` (mitmproxy's error path answers and the error hooks run),
    then close the upstream connection, whose HTTP/1 client still waits for the upstream's own reply."""
    handler = _handler(flow.client_conn)
    if handler is None:
        raise RuntimeError("the flow's client connection is gone")
    await handler.server_event(_InjectedFailure(flow, stream_id, message))
    close_upstream(flow)


async def end_reply(flow: http.HTTPFlow, headers: http.Response | None = None, data: bytes = b"") -> None:
    """End the reply the flow's stream is waiting for, then close the upstream connection it came on.

    ``headers``: the reply's head when the upstream sent none; ``data``: bytes to add before the end.
    The connection goes because its HTTP/1 client still waits for the upstream's own reply: left
    open, it could be reused for the next request and read that late reply as the answer to it. The
    answer the client gets says ``connection: close`` (the caller sets it), so the failure that
    closing reports to the already finished stream finds the client connection closed and goes nowhere.
    """
    handler = _handler(flow.client_conn)
    if handler is None:
        raise RuntimeError("the flow's client connection is gone")
    injected: list[events.Event] = []
    if headers is not None:
        injected.append(_InjectedResponseHeaders(flow, headers))
    if data:
        injected.append(_InjectedResponseData(flow, data))
    injected.append(_InjectedResponseEnd(flow))
    for event in injected:
        await handler.server_event(event)
    close_upstream(flow)
