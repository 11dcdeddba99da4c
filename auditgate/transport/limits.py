"""Body size limits: the settings, what each refusal says, and the byte cap of a streamed reply.

A request's limit applies to its body as received and, when it is compressed, as inflated; a reply's
the same, and to the total bytes of a reply streamed through (server-sent events). No mitmproxy import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from auditgate.core.errors import error_body

MB = 1024 * 1024

REQUEST_TOO_LARGE = (413, "gateway_request_too_large")
RESPONSE_TOO_LARGE = (502, "gateway_response_too_large")
REQUEST_UNDECODABLE = (400, "gateway_request_undecodable")
RESPONSE_UNDECODABLE = (502, "gateway_response_undecodable")

# mitmproxy's own messages when its body_size_limit stops a body (proxy/layers/http/__init__.py).
MITMPROXY_REQUEST_TOO_LARGE = "Request body exceeds mitmproxy's body_size_limit."
MITMPROXY_RESPONSE_TOO_LARGE = "Response body exceeds mitmproxy's body_size_limit."

# Compressed bodies up to this size are inflated in the event loop (a few hundred microseconds at
# most); larger ones, and any that inflate past INLINE_MAX_INFLATED, in a worker thread.
INLINE_MAX_RAW = 4 * 1024
INLINE_MAX_INFLATED = 256 * 1024


@dataclass(frozen=True)
class BodyLimits:
    request_bytes: int
    response_bytes: int

    @classmethod
    def from_megabytes(cls, request_mb: int, response_mb: int) -> BodyLimits:
        for name, value in (("gateway_request_max_mb", request_mb), ("gateway_response_max_mb", response_mb)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1 (MB), not {value}")
        return cls(request_mb * MB, response_mb * MB)

    @property
    def largest(self) -> int:
        """What mitmproxy may buffer of any body before the gateway's own checks run (its body_size_limit)."""
        return max(self.request_bytes, self.response_bytes)


def declared_length(content_length: str | None) -> int | None:
    """A Content-Length header's value, or None when absent or not a plain number."""
    if content_length is None:
        return None
    value = content_length.strip()
    return int(value) if value.isdigit() else None


def too_large_message(direction: str, limit: int, inflated: bool) -> str:
    what = "inflated " if inflated else ""
    if direction == "request":
        return f"the request body is larger {what}than this gateway accepts ({_size(limit)}); it was not sent"
    return f"the reply body is larger {what}than this gateway passes on ({_size(limit)}); it was withheld"


def undecodable_message(direction: str, reason: str) -> str:
    if direction == "request":
        return f"the request body could not be decoded ({reason}); it was not sent"
    return f"the reply body could not be decoded ({reason}); it was withheld"


def _size(n: int) -> str:
    return f"{n // MB} MB" if n % MB == 0 else f"{n} bytes"


def sse_error_event(kind: str, status: int, code: str, message: str) -> bytes:
    """The server-sent event that ends a stream the gateway had to cut, in the shape the openai SDK raises on.

    The SDK raises APIError for an event whose data holds an "error" object; Responses API clients also
    know the "error" event type. ``kind`` is the endpoint kind (``chat`` streams carry data lines only).
    """
    error = json.loads(error_body(status, code, message))
    if kind == "chat":
        return f"data: {json.dumps(error)}\n\n".encode()
    event = {"type": "error", "code": code, "message": message, "param": None, **error}
    return f"event: error\ndata: {json.dumps(event)}\n\n".encode()


class StreamByteCap:
    """A mitmproxy stream callable for a reply streamed through as it arrives: at most ``limit`` bytes pass.

    Past the limit the client gets ``end_event`` (an SSE error event, or nothing when the stream is
    compressed and an event in plain text would only garble it) and nothing more: what the upstream
    sends after that is counted and dropped, never buffered. ``on_exceeded`` is called then, once (the
    client, told, may hang up before the stream ends).
    """

    def __init__(self, limit: int, end_event: bytes | None, on_exceeded: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.end_event = end_event
        self.on_exceeded = on_exceeded
        self.received = 0
        self.exceeded = False

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        if not data:  # the end of the stream: nothing of ours to add (never b"" mid-stream)
            return []
        self.received += len(data)
        if self.exceeded:
            return []
        if self.received > self.limit:
            self.exceeded = True
            if self.on_exceeded is not None:
                self.on_exceeded()
            return [self.end_event] if self.end_event else []
        return data
