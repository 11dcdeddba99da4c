"""Passes server-sent event streams to the client event by event instead of buffering them to the end."""

from __future__ import annotations

from mitmproxy import http

from auditgate.core.request_facts import is_event_stream


class SseStreaming:
    """Streams text/event-stream responses through as they arrive."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.live and flow.response and not flow.response.stream and is_event_stream(flow.response):
            flow.response.stream = True


addons = [SseStreaming()]
