"""The mitmproxy protocol layers for tunnels: a pass-through tunnel relayed and metered, and a refused one.

mitmproxy chooses the layer that carries a connection's bytes in its ``next_layer`` hook; an addon may
choose instead (``nextlayer.layer = ...``). The tunnels addon puts ``MeteredTunnelLayer`` on an
authorised pass-through tunnel, and ``RefusedLayer`` wherever mitmproxy would relay bytes that no hook
of the gateway reads (raw TCP or UDP, DNS, raw QUIC).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import DNSLayer, RawQuicLayer, TCPLayer, UDPLayer

from auditgate.routing.tunnels import TunnelMeter

logger = logging.getLogger(__name__)

# Layers that move bytes no hook of the gateway reads.
UNREAD_LAYERS = (TCPLayer, UDPLayer, DNSLayer, RawQuicLayer)
_MAX_DEPTH = 16


class MeteredTunnelLayer(TCPLayer):
    """Relays a pass-through tunnel's bytes without reading them, counting them each way.

    mitmproxy's TCP layer without a flow (``ignore=True``) keeps no copy of the bytes and calls no
    hook; this one also counts, cuts the tunnel at its next chunk once the audit log reports it cannot
    write (``audit_ok``), and calls ``on_end`` exactly once when the tunnel is over.
    """

    def __init__(self, context, meter: TunnelMeter, audit_ok: Callable[[], bool],
                 on_end: Callable[[TunnelMeter], None]) -> None:
        super().__init__(context, ignore=True)
        self.meter, self.audit_ok, self.on_end = meter, audit_ok, on_end

    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super().start(event)
        if self._handle_event == self.done:  # the host could not be reached: the client is closed already
            self._end("host_unreachable")

    _handle_event = start  # TCPLayer names its own start here; ours must run instead

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if not self.audit_ok():
                yield from self._cut()
                return
            self.meter.count(event.connection == self.context.client, len(event.data))
        yield from super().relay_messages(event)
        if self._handle_event == self.done:
            self._end("closed")

    def _cut(self) -> layer.CommandGenerator[None]:
        logger.error("pass-through tunnel %s to %s:%d cut: the audit log cannot write", self.meter.tunnel_id,
                     self.meter.host, self.meter.port)
        self._handle_event = self.done
        for connection in (self.context.server, self.context.client):
            if connection.state is not ConnectionState.CLOSED:
                yield commands.CloseConnection(connection)
        self._end("audit_unavailable")

    def _end(self, why: str) -> None:
        if self.meter.ended is None:
            self.meter.ended = why
            self.on_end(self.meter)


class RefusedLayer(layer.Layer):
    """Relays nothing: closes the client's connection at once (and the server's, if one was opened)."""

    def __init__(self, context, on_refused: Callable[[], None]) -> None:
        super().__init__(context)
        self.on_refused = on_refused
        self.refused = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.refused:
            return  # whatever still arrives is dropped
        self.refused = True
        try:
            self.on_refused()
        except Exception:  # the refusal stands whatever happens to its report
            logger.exception("could not report a refused tunnel")
        if self.context.server.state is not ConnectionState.CLOSED:
            yield commands.CloseConnection(self.context.server)
        yield commands.CloseConnection(self.context.client)


def unread_layer(chosen: layer.Layer | None) -> str | None:
    """The name of the first layer in a chosen stack that would move bytes unread; None when there is none."""
    depth = 0
    while chosen is not None and depth < _MAX_DEPTH:
        if isinstance(chosen, MeteredTunnelLayer):
            return None
        if isinstance(chosen, UNREAD_LAYERS):
            return type(chosen).__name__
        chosen = getattr(chosen, "child_layer", None)
        depth += 1
    return None
