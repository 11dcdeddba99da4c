"""Routes each flow to a configured upstream and refuses every other host: the gateway is never an open relay."""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from auditgate.core.flow_contract import PASSTHROUGH, UPSTREAM
from auditgate.core.options import add_gateway_options, load_rules
from auditgate.core.refusal import is_answered, refuse
from auditgate.routing.upstreams import UpstreamTable, shared_upstreams

logger = logging.getLogger("auditgate.addons.upstream_routing")


class UpstreamRouting:
    """Routes flows to configured upstreams; refuses other hosts with 403; marks CONNECTs to pass-through hosts."""

    def __init__(self) -> None:
        self.table: UpstreamTable | None = None

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        self.table = load_rules(shared_upstreams)
        hosts = ", ".join(f"{u.host}{':' + str(u.port) if u.port else ''}" for u in self.table.upstreams) or "none"
        logger.info("upstreams: %s; pass-through: %d host(s)", hosts, len(self.table.passthrough))

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # Forward mode: the CONNECT decides whether a tunnel is intercepted, passed through or refused.
        host, port = flow.request.host, flow.request.port
        if self.table is None:
            refuse(flow, 503, "gateway_not_configured", "the gateway has no upstream configuration loaded")
        elif self.table.upstream_for(host, port):
            return
        elif self.table.is_passthrough(host, port):
            # The tunnels addon decides whether this caller may have the tunnel, and relays and audits it.
            # Nothing here lets it pass unread: without that addon the connection is intercepted like an
            # upstream's, and each request in it refused below (a pass-through host is not an upstream).
            PASSTHROUGH.set(flow, True)
        else:
            refuse(flow, 403, "gateway_forbidden", f"{host}:{port} is not an upstream this gateway serves")

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        host, port = flow.request.host, flow.request.port
        if self.table is None:
            refuse(flow, 503, "gateway_not_configured", "the gateway has no upstream configuration loaded")
            return
        upstream = self.table.route(host, port, isinstance(flow.client_conn.proxy_mode, ReverseMode))
        if upstream is None:
            refuse(flow, 403, "gateway_forbidden", f"{host}:{port} is not an upstream this gateway serves")
            return
        UPSTREAM.set(flow, {"host": host, "port": port, "key_source": upstream.key_source})


addons = [UpstreamRouting()]
