"""Tunnels the gateway does not read are governed or refused: pass-through needs a caller and leaves audit entries.

Forward mode. A CONNECT to a pass-through host (upstreams.yaml ``passthrough:``) opens a tunnel only for
an authenticated caller (``Proxy-Authorization`` on the CONNECT: Bearer, or Basic with the token as
password), only if the grants allow it, and only once the audit log has taken its "opened" entry; 407,
403 or 503 otherwise, recorded and audited like every refused CONNECT. Its bytes are relayed unread and
counted, and its "closed" entry gives bytes each way and duration. Anything else mitmproxy would relay
without a hook of ours reading it (raw TCP or UDP after a CONNECT to an intercepted upstream, DNS, raw
QUIC, a protocol switched to after an HTTP 101) is refused and audited; options that would make such
tunnels (``ignore_hosts``, ``allow_hosts``, ``tcp_hosts``, ``udp_hosts``, raw reverse or DNS modes)
stop the start. The logic is in ``auditgate.routing.tunnels`` and ``auditgate.routing.tunnel_layers``.
"""

from __future__ import annotations

import logging

from mitmproxy import connection, ctx, exceptions, http, tcp, udp
from mitmproxy.addons.next_layer import NextLayer
from mitmproxy.proxy import layer
from mitmproxy.proxy.mode_specs import ProxyMode

from auditgate.core.config import ConfigError
from auditgate.core.credentials import (
    CREDENTIAL_METADATA_KEYS,
    remove_credential_headers,
)
from auditgate.core.flow_contract import PASSTHROUGH, TUNNEL, AuditUnavailable, services
from auditgate.core.options import add_gateway_options, rules_dir
from auditgate.core.refusal import is_answered, refuse
from auditgate.identity.authenticator import AuthFailure
from auditgate.identity.identities_file import IdentitiesFile, identities_file
from auditgate.routing.tunnel_layers import (
    MeteredTunnelLayer,
    RefusedLayer,
    unread_layer,
)
from auditgate.routing.tunnels import (
    AUDIT_KIND,
    PROXY_AUTHENTICATE,
    UNGOVERNED_HOST_OPTIONS,
    TunnelMeter,
    may_tunnel,
    refused_fields,
    tunnel_credential,
    ungoverned_options,
)

logger = logging.getLogger("auditgate.addons.tunnels")

AUDIT_UNAVAILABLE = "gateway_audit_unavailable"
_CHECKED_OPTIONS = frozenset({*UNGOVERNED_HOST_OPTIONS, "mode"})


def _peer(conn: connection.Connection | None) -> str | None:
    return conn.peername[0] if conn is not None and conn.peername else None


class Tunnels:
    """Opens pass-through tunnels for authorised callers only, meters and audits them; refuses unread bytes."""

    def __init__(self) -> None:
        self.identities: IdentitiesFile | None = None
        # Allowed pass-through CONNECTs waiting for their tunnel's first bytes, by the CONNECT's server
        # connection (the tunnel's layer is chosen on that connection), then open tunnels by the same key.
        self._waiting: dict[str, tuple[TunnelMeter, str]] = {}
        self._open: dict[str, tuple[TunnelMeter, str]] = {}
        self._refused_flows: set[str] = set()  # TCP/UDP flows refused at their start: their bytes are dropped
        self._fallback_next_layer = NextLayer()

    # ---- options --------------------------------------------------------------------------------------
    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if updated & _CHECKED_OPTIONS:
            modes = []
            for spec in ctx.options.mode:
                try:
                    parsed = ProxyMode.parse(spec)
                except ValueError:
                    continue  # mitmproxy's own option check reports it
                modes.append((parsed.type_name, getattr(parsed, "scheme", None)))
            problems = ungoverned_options({name: getattr(ctx.options, name) for name in UNGOVERNED_HOST_OPTIONS},
                                          modes)
            if problems:
                raise exceptions.OptionsError("auditgate refuses options that would open tunnels nobody governs: "
                                              + "; ".join(problems))
        if "gateway_rules" in updated:
            try:
                self.identities = identities_file(rules_dir())
            except ConfigError as e:
                raise exceptions.OptionsError(f"auditgate: {e}") from None

    # ---- the CONNECT to a pass-through host -------------------------------------------------------------
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow) or not PASSTHROUGH.get(flow):
            return  # an intercepted upstream: every request in it is authenticated by caller_auth
        host, port, client = flow.request.host, flow.request.port, _peer(flow.client_conn)
        credential = tunnel_credential(flow.request.headers.get("proxy-authorization", ""),
                                       flow.metadata.get("proxyauth"))
        # The credential is consumed here: it reaches no record (nor any later hook).
        remove_credential_headers(flow.request.headers)
        for key in CREDENTIAL_METADATA_KEYS:
            flow.metadata.pop(key, None)
        if self.identities is None:
            self._refuse(flow, None, 503, "gateway_not_configured", "the gateway has no identities loaded")
            return
        snapshot = self.identities.current()
        result = await snapshot.authenticator.authenticate(credential)
        if isinstance(result, AuthFailure):
            reason = result.reason if credential else (
                "a pass-through tunnel needs the caller's gateway token as proxy credentials "
                "(HTTPS_PROXY=http://agent:<token>@gateway:port, or Proxy-Authorization: Bearer <token>)")
            self._refuse(flow, None, 407, "gateway_unauthenticated", reason)
            for value in PROXY_AUTHENTICATE:
                flow.response.headers.add("Proxy-Authenticate", value)
            return
        grant = may_tunnel(snapshot.authorization, result.groups, host, port)
        if not grant.allowed:
            self._refuse(flow, result.name, 403, "gateway_forbidden", grant.reason)
            return
        meter = TunnelMeter(flow.id, host, port, client, caller=result.name, identity=result.as_metadata(),
                            grant=grant.grant)
        try:
            self._audit(meter.opened_fields())
        except AuditUnavailable as e:
            logger.error("pass-through tunnel to %s:%d for %s refused: the audit log cannot write (%s)",
                         host, port, result.name, e)
            self._refuse(flow, result.name, 503, AUDIT_UNAVAILABLE,
                         "the gateway cannot write its audit log, so it opens no tunnel until it can")
            return
        TUNNEL.set(flow, meter.record())
        self._waiting[flow.server_conn.id] = (meter, flow.client_conn.id)
        logger.info("pass-through tunnel to %s:%d for %s (client %s)", host, port, result.name, client)

    @staticmethod
    def _refuse(flow: http.HTTPFlow, caller: str | None, status: int, code: str, reason: str) -> None:
        TUNNEL.set(flow, {"caller": caller, "host": flow.request.host, "port": flow.request.port, "refused": reason})
        refuse(flow, status, code, reason)

    @staticmethod
    def _audit(fields: dict) -> None:
        events = services.audit_events
        if events is None:
            raise AuditUnavailable("the audit log is not loaded")
        events.append_event(AUDIT_KIND, fields)

    @staticmethod
    def _audit_ok() -> bool:
        events = services.audit_events
        return events is not None and not getattr(events, "unavailable", None)

    # ---- which layer carries the bytes -------------------------------------------------------------------
    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        # Not a flow hook: an exception here would leave the choice to mitmproxy, so it refuses instead.
        try:
            self._choose_layer(nextlayer)
        except Exception:
            logger.exception("choosing a connection's layer failed; the connection is refused")
            nextlayer.layer = RefusedLayer(nextlayer.context, lambda: self._report_refused(nextlayer.context,
                                                                                          "internal_error"))

    def _choose_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        waiting = self._waiting.pop(context.server.id, None) if nextlayer.layer is None else None
        if waiting is not None:
            meter, client_id = waiting
            self._open[context.server.id] = waiting
            nextlayer.layer = MeteredTunnelLayer(context, meter, self._audit_ok,
                                                 lambda m, key=context.server.id: self._closed(key, m))
            return
        if nextlayer.layer is None:  # let mitmproxy choose now, and look at what it chose
            master_next_layer = ctx.master.addons.get("nextlayer") if ctx.master else None
            (master_next_layer or self._fallback_next_layer).next_layer(nextlayer)
            if nextlayer.layer is None:
                return  # not enough bytes yet to choose: asked again with more
        unread = unread_layer(nextlayer.layer)
        if unread is not None:
            nextlayer.layer = RefusedLayer(context, lambda: self._report_refused(context, unread))

    def _report_refused(self, context, what: str) -> None:
        address = context.server.address if context.server else None
        host, port = (address[0], address[1]) if address else (None, None)
        client = _peer(context.client)
        reason = "bytes the gateway cannot read (not TLS to an upstream it serves, not HTTP) are not relayed"
        logger.warning("refused a %s tunnel from %s to %s:%s: %s", what, client, host, port, reason)
        try:
            self._audit(refused_fields(host, port, client, what, reason))
        except AuditUnavailable as e:  # nothing was relayed: the refusal stands without its entry
            logger.error("the refused tunnel from %s to %s:%s has no audit entry: %s", client, host, port, e)

    # ---- the end of a tunnel ---------------------------------------------------------------------------
    def _closed(self, key: str, meter: TunnelMeter) -> None:
        self._open.pop(key, None)
        logger.info("pass-through tunnel to %s:%d for %s ended (%s): %d bytes up, %d down, %d ms", meter.host,
                    meter.port, meter.caller, meter.ended, meter.bytes_up, meter.bytes_down, meter.duration_ms())
        try:
            self._audit(meter.closed_fields())
        except AuditUnavailable as e:
            # The tunnel is over; its "opened" entry stands in the log without its "closed" one.
            logger.error("pass-through tunnel %s to %s:%d for %s ended (%s, %d bytes up, %d down) but its closing "
                         "audit entry could not be written: %s", meter.tunnel_id, meter.host, meter.port,
                         meter.caller, meter.ended, meter.bytes_up, meter.bytes_down, e)
        except Exception:
            logger.exception("the closing audit entry of pass-through tunnel %s failed", meter.tunnel_id)

    def _end_all(self, client_id: str | None, why: str) -> None:
        for table in (self._waiting, self._open):
            for key, (meter, owner) in list(table.items()):
                if client_id is None or owner == client_id:
                    table.pop(key, None)
                    if meter.ended is None:
                        meter.ended = why
                        self._closed(key, meter)

    def client_disconnected(self, client: connection.Client) -> None:
        # A tunnel's layer normally reports its end first; one that never carried a byte ends here.
        self._end_all(client.id, "client_disconnected")

    def done(self) -> None:
        self._end_all(None, "gateway_stopping")  # before the audit log (later in the bundle) closes

    # ---- a protocol switch (HTTP 101) would relay raw bytes -------------------------------------------------
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.live and flow.response is not None and flow.response.status_code == 101 and not flow.websocket:
            protocol = flow.response.headers.get("upgrade", "")[:40]
            refuse(flow, 502, "gateway_protocol_refused",
                   f"the upstream switched to another protocol ({protocol!r}) that the gateway cannot read")

    # ---- last line: a TCP or UDP flow no layer choice of ours let through ----------------------------------
    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._refuse_raw_flow(flow, "TCPLayer")

    def udp_start(self, flow: udp.UDPFlow) -> None:
        self._refuse_raw_flow(flow, "UDPLayer")

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        if flow.id in self._refused_flows and flow.messages:
            flow.messages[-1].content = b""

    udp_message = tcp_message

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        self._refused_flows.discard(flow.id)

    tcp_error = udp_end = udp_error = tcp_end

    def _refuse_raw_flow(self, flow, what: str) -> None:
        # Refused first, reported after: a server not yet connected is never dialled (mitmproxy checks
        # the connection's error after server_connect), bytes of one already connected are dropped.
        self._refused_flows.add(flow.id)
        if flow.server_conn.timestamp_start is None:
            flow.server_conn.error = "refused by the gateway: raw bytes it cannot read"
        if flow.killable:
            flow.kill()
        address = flow.server_conn.address
        client = _peer(flow.client_conn)
        reason = "raw bytes the gateway cannot read are not relayed"
        logger.warning("refused a %s flow from %s to %s", what, client, address)
        try:
            self._audit(refused_fields(address[0] if address else None, address[1] if address else None, client,
                                       what, reason, tunnel_id=flow.id))
        except AuditUnavailable as e:
            logger.error("the refused %s flow %s has no audit entry: %s", what, flow.id, e)


addons = [Tunnels()]
