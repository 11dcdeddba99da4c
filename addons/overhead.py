"""Adds x-gateway-overhead-ms: the time the gateway itself spent on a flow, upstream time excluded."""

from __future__ import annotations

import time

from mitmproxy import http

from auditgate.core.flow_contract import APPROVAL, OVERHEAD_MS, REQUEST_READY

HEADER = "x-gateway-overhead-ms"


class OverheadHeader:
    """Measures the gateway's own time per flow and reports it in a response header and the flow's metadata."""

    def request(self, flow: http.HTTPFlow) -> None:
        # Last request hook of the bundle: the request leaves for the upstream right after this.
        if flow.live and flow.response is None:
            REQUEST_READY.set(flow, time.time())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A streamed response's headers go out right after this hook, so its header is set here.
        if flow.live and flow.response and flow.response.stream:
            self._stamp(flow, flow.response.timestamp_start)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.live and flow.response and not flow.response.stream:
            self._stamp(flow, flow.response.timestamp_end or flow.response.timestamp_start)

    @staticmethod
    def _stamp(flow: http.HTTPFlow, upstream_done: float | None) -> None:
        now = time.time()
        request_in = flow.request.timestamp_end or flow.request.timestamp_start
        ready = REQUEST_READY.pop(flow)
        if ready is None or upstream_done is None:
            # Answered by the gateway itself (a refusal): all of it is gateway time.
            overhead = now - request_in
        else:
            overhead = (ready - request_in) + max(0.0, now - upstream_done)
        overhead -= (APPROVAL.get(flow) or {}).get("waited_s", 0.0)  # a human's time, not ours
        overhead_ms = round(max(0.0, overhead) * 1000, 3)
        OVERHEAD_MS.set(flow, overhead_ms)
        flow.response.headers[HEADER] = f"{overhead_ms:.3f}"


addons = [OverheadHeader()]
