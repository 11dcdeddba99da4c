"""Puts the upstream's real API key on forwarded requests and takes it off the flow once it is sent."""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from auditgate.core.credentials import remove_credential_headers
from auditgate.core.flow_contract import KEY_HEADER
from auditgate.core.options import add_gateway_options, load_rules
from auditgate.core.refusal import is_answered, refuse
from auditgate.routing.upstreams import Upstream, UpstreamTable, shared_upstreams

logger = logging.getLogger("auditgate.addons.key_custody")

SCRUBBED = "[upstream key removed by auditgate]"


class KeyCustody:
    """Injects the upstream key (callers never hold it) and removes it from the flow after sending."""

    def __init__(self) -> None:
        self.table: UpstreamTable | None = None
        self._keys: dict[Upstream, str | None] = {}

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        table = load_rules(shared_upstreams)
        self.table, self._keys = table, {}
        for upstream in table.upstreams:
            if self._key_for(upstream) is None:
                logger.warning(
                    "no key for upstream %s (%s is unset or empty): its requests will be refused with 502",
                    upstream.host,
                    upstream.key_source,
                )

    def _key_for(self, upstream: Upstream) -> str | None:
        # Read once per upstream: a key in the process environment does not change; rotate by restart.
        if upstream not in self._keys:
            self._keys[upstream] = upstream.read_key()
        return self._keys[upstream]

    def _upstream_for(self, flow: http.HTTPFlow) -> Upstream | None:
        if self.table is None:
            return None
        return self.table.route(flow.request.host, flow.request.port, isinstance(flow.client_conn.proxy_mode, ReverseMode))

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        upstream = self._upstream_for(flow)
        key = self._key_for(upstream) if upstream else None
        if upstream is None or key is None:
            where = upstream.key_source if upstream else "the upstream configuration"
            refuse(flow, 502, "gateway_upstream_unavailable", f"the gateway holds no key for this upstream ({where})")
            return
        remove_credential_headers(flow.request.headers)
        flow.request.headers[upstream.key_header] = upstream.auth_header_value(key)
        KEY_HEADER.set(flow, upstream.key_header)

    def _take_back(self, flow: http.HTTPFlow) -> None:
        # The request has left by now; nothing downstream (mitmweb, -w files, our records) may see the key.
        header = KEY_HEADER.pop(flow)
        if header:
            flow.request.headers.pop(header, None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._take_back(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._take_back(flow)
        if flow.live and flow.response and not flow.response.stream:
            self._scrub_echo(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._take_back(flow)

    def _scrub_echo(self, flow: http.HTTPFlow) -> None:
        # An upstream that echoes the key (some error messages quote it) must not hand it to the caller.
        keys = [k for k in self._keys.values() if k]
        body = flow.response.get_content(strict=False) if flow.response.raw_content else b""
        leaked = [k for k in keys if k.encode() in body]
        if leaked:
            for k in leaked:
                body = body.replace(k.encode(), SCRUBBED.encode())
            flow.response.content = body
            logger.warning("removed the upstream key echoed in a response from %s", flow.request.pretty_host)


addons = [KeyCustody()]
