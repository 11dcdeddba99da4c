"""Passes server-sent event streams to the client event by event, and keeps what passed for a stream cut short."""

from __future__ import annotations

import weakref

from mitmproxy import http

from auditgate.core.flow_contract import GUARD, STREAM_CUT
from auditgate.core.request_facts import is_event_stream


class _KeptStream:
    """The outermost stream callable: passes what the callables before it made, and keeps a copy.

    mitmproxy keeps a streamed body (store_streamed_bodies) only once the stream ends well; a stream the
    upstream cuts or resets ends in the error hook with no body at all, although the client had events.
    The copy kept here is exactly what went to the client (the chunks this callable returns are sent as
    they are), and becomes the record's body then. Like key_custody's wrapper it passes `isinstance` and
    attribute reads to the callable before it, and puts it back when the stream ends well.
    """

    def __init__(self, flow: http.HTTPFlow, passing, kept: bytearray) -> None:
        self._flow, self._passing, self._kept = flow, passing, kept

    @property
    def __class__(self):  # the earlier addons' checks (isinstance) still find their own callable
        return type(self._passing) if callable(self._passing) else _KeptStream

    def __getattr__(self, name: str):
        passing = self.__dict__.get("_passing")
        if not callable(passing):
            raise AttributeError(name)
        return getattr(passing, name)

    def __call__(self, data: bytes):
        if callable(self._passing):
            out = self._passing(data)
            chunks = [out] if isinstance(out, (bytes, bytearray)) else list(out)
        else:
            chunks = [data] if data else []
        for chunk in chunks:
            self._kept += chunk
        if not data and self._flow.response is not None and self._flow.response.stream is self:
            self._flow.response.stream = self._passing  # ended well: mitmproxy keeps the body itself
        return chunks


class SseStreaming:
    """Streams text/event-stream responses through as they arrive, keeping what passed (see _KeptStream).

    Only a stream nobody has claimed is set streaming here: the masking addon (before this one) puts its
    own stream in place for every event stream it masks. And never a reply whose response hooks already
    failed: the bundle's guard took the stream back so the reply could be replaced by a refusal, and
    streaming it here would send it out raw before that. Every stream, claimed or not, gets the keeper.
    """

    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # flow → bytes passed so far

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live or not flow.response:
            return
        response = flow.response
        if not response.stream:
            if not is_event_stream(response) or GUARD.get(flow) is not None:
                return
            response.stream = True
        kept = bytearray()
        self._kept[flow] = kept
        response.stream = _KeptStream(flow, response.stream, kept)

    def response(self, flow: http.HTTPFlow) -> None:
        self._kept.pop(flow, None)  # ended well: the record holds the body mitmproxy kept

    def error(self, flow: http.HTTPFlow) -> None:
        """A stream cut (the upstream closed or reset it, or the client left): the record holds what passed."""
        kept = self._kept.pop(flow, None)
        response = flow.response
        if kept is None or response is None or response.raw_content:
            return
        response.raw_content = bytes(kept)
        STREAM_CUT.set(flow, {"reason": flow.error.msg if flow.error else "ended without its end",
                              "bytes_to_client": len(kept)})


addons = [SseStreaming()]
