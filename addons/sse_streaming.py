"""Passes server-sent event streams to the client event by event instead of buffering them to the end."""

from __future__ import annotations

from mitmproxy import http


def is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").split(";")[0].strip().lower() == "text/event-stream"


class SseStreaming:
    """Streams text/event-stream responses through as they arrive."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.live and flow.response and not flow.response.stream and is_event_stream(flow.response):
            flow.response.stream = True


addons = [SseStreaming()]
