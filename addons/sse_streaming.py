"""Passes server-sent event streams to the client event by event instead of buffering them to the end."""

from __future__ import annotations

from mitmproxy import http

from auditgate.core.flow_contract import GUARD
from auditgate.core.request_facts import is_event_stream


class SseStreaming:
    """Streams text/event-stream responses through as they arrive.

    Only a stream nobody has claimed: the masking addon (before this one) puts its own stream in place
    for every event stream it masks. And never a reply whose response hooks already failed: the
    bundle's guard took the stream back so the reply could be replaced by a refusal, and streaming it
    here would send it out raw before that.
    """

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live or not flow.response or flow.response.stream or not is_event_stream(flow.response):
            return
        if GUARD.get(flow) is not None:
            return
        flow.response.stream = True


addons = [SseStreaming()]
