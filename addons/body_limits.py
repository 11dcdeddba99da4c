"""Request and reply body size limits, applied to the inflated size while inflating, off the event loop.

Runs right after caller_auth: only an authenticated caller makes the gateway inflate anything. A
compressed request is inflated here once, with a cap, and replaced by its decoded bytes (its
content-encoding dropped), so no later addon (request facts, policy, masking) inflates it again; a
compressed reply the same, before masking's response hook. Also refuses, at start, the mitmproxy
options that would let bytes past the gateway's hooks.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import human

from auditgate.core.flow_contract import BODY_LIMITS, REFUSAL, BodyLimitsRecord
from auditgate.core.refusal import is_answered, refuse
from auditgate.core.request_facts import facts_of, header_value, is_event_stream
from auditgate.transport import limits
from auditgate.transport.inflate import (
    BodyTooLarge,
    BodyUndecodable,
    content_codings,
    inflate,
)
from auditgate.transport.limits import BodyLimits, StreamByteCap

logger = logging.getLogger("auditgate.addons.body_limits")

LIMIT_OPTIONS = ("gateway_request_max_mb", "gateway_response_max_mb")

# mitmproxy options that would let bytes past the gateway's hooks, or change a request after them.
# Each refuses the start (or the change at run time) with its reason.
_BYPASSING_OPTIONS: dict[str, str] = {
    "stream_large_bodies": "it sends a large request's headers (the caller's credentials with them) and body "
                           "upstream before the gateway's request hooks run, and streams large replies to the "
                           "caller unmasked; use gateway_request_max_mb / gateway_response_max_mb instead",
    "map_remote": "it sends requests to another URL after the gateway chose and checked the upstream "
                  "(with the upstream key on); add the upstream to upstreams.yaml instead",
    "modify_body": "it changes request bodies after the gateway's policy and masking checked them",
    "modify_headers": "it changes headers after the gateway's checks (and could set or strip credentials)",
    # On by default in mitmproxy: turned off at load (below), refused if turned on again.
    "onboarding": "mitmproxy's onboarding app answers http://mitm.it/ (its page and CA) to any caller, "
                  "unauthenticated, before the gateway's checks run; callers get the CA from certs/",
}


def _bypassing_option_set(name: str) -> bool:
    value = getattr(ctx.options, name, None)
    return bool(value)


def _drop_body(message: http.Message) -> None:
    """An oversized body is neither kept nor recorded (BODY_LIMITS has its size); its headers stay as sent."""
    message.raw_content = b""


class BodySizeLimits:
    """Refuses bodies over their limits (413 for requests, 502 for replies), inflating with a cap."""

    def __init__(self) -> None:
        self._running = False
        self._body_size_limit_too_large = False
        self.limits = BodyLimits.from_megabytes(32, 64)
        # Inflating runs here, not in the event loop nor in asyncio's default executor (which other
        # addons use): a burst of bombs waits for these two threads, and never stalls other callers.
        self._inflating = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auditgate-inflate")

    def load(self, loader) -> None:
        # Before any server listens (and before configure, which would refuse it as set).
        options = getattr(getattr(loader, "master", None), "options", None)
        if options is not None and getattr(options, "onboarding", False):
            options.update(onboarding=False)
            logger.info("mitmproxy's onboarding app (mitm.it) is off: it would answer callers before the "
                        "gateway's checks; the CA is in certs/")
        loader.add_option(
            "gateway_request_max_mb", int, 32,
            "Largest request body in MB, as received and once inflated (413 gateway_request_too_large).")
        loader.add_option(
            "gateway_response_max_mb", int, 64,
            "Largest reply body in MB, as received, once inflated, and in total for a streamed reply "
            "(502 gateway_response_too_large).")

    def configure(self, updated: set[str]) -> None:
        for name, why in _BYPASSING_OPTIONS.items():
            if name in updated and _bypassing_option_set(name):
                raise exceptions.OptionsError(f"auditgate refuses {name}: {why}")
        if "validate_inbound_headers" in updated and not getattr(ctx.options, "validate_inbound_headers", True):
            raise exceptions.OptionsError(
                "auditgate refuses validate_inbound_headers=false: malformed framing (Content-Length with "
                "Transfer-Encoding) could smuggle a second request past the gateway's hooks")
        if updated & {*LIMIT_OPTIONS, "body_size_limit"}:
            try:
                self.limits = BodyLimits.from_megabytes(ctx.options.gateway_request_max_mb,
                                                        ctx.options.gateway_response_max_mb)
                current = human.parse_size(ctx.options.body_size_limit) if "body_size_limit" in ctx.options else 0
            except ValueError as e:
                raise exceptions.OptionsError(f"auditgate: {e}") from None
            self._body_size_limit_too_large = current is None or current > self.limits.largest
            if self._running:
                self._apply_body_size_limit()

    def running(self) -> None:
        # Not in configure at start: an option update there re-enters configure, and when another
        # addon's configure then fails, mitmproxy's rollback and this update would chase each other.
        self._running = True
        self._apply_body_size_limit()

    def _apply_body_size_limit(self) -> None:
        if self._body_size_limit_too_large and self.limits is not None:
            # mitmproxy buffers a whole body before any hook sees it; its own limit stops one that
            # is larger than anything the gateway would pass (a declared length at once, a chunked
            # one once that much has come), whoever sends it.
            self._body_size_limit_too_large = False
            ctx.options.update(body_size_limit=str(self.limits.largest))

    def done(self) -> None:
        self._inflating.shutdown(wait=False, cancel_futures=True)

    # ---- requests -----------------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        declared = limits.declared_length(header_value(flow.request.headers, b"content-length", None))
        if declared is not None and declared > self.limits.request_bytes:
            # Refused at the headers, so nothing of the body is ever inflated or parsed; mitmproxy still
            # reads it (at most its body_size_limit), the request hook drops it, and the answer goes out.
            self._record(flow, request_bytes=declared)
            self._refuse(flow, "request", self.limits.request_bytes, inflated=False)

    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live:
            return
        refusal = REFUSAL.get(flow)
        if refusal and refusal.get("code") == limits.REQUEST_TOO_LARGE[1]:
            _drop_body(flow.request)
            return
        if is_answered(flow):
            return
        raw = flow.request.raw_content or b""
        self._record(flow, request_bytes=len(raw))
        if len(raw) > self.limits.request_bytes:
            _drop_body(flow.request)
            self._refuse(flow, "request", self.limits.request_bytes, inflated=False)
            return
        encoding = header_value(flow.request.headers, b"content-encoding")
        if not encoding:
            return
        decoded = await self._inflate(flow, flow.request, "request", self.limits.request_bytes)
        if decoded is not None:
            self._record(flow, request_inflated_bytes=len(decoded))
            # Later addons (request facts, policy, masking) read the decoded bytes and never inflate again;
            # the upstream gets them plain.
            flow.request.headers.pop("content-encoding", None)
            flow.request.content = decoded

    # ---- responses ----------------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if not flow.live or response is None or REFUSAL.on(flow):
            return
        declared = limits.declared_length(header_value(response.headers, b"content-length", None))
        if declared is not None:
            self._record(flow, response_bytes=declared)
        if is_event_stream(response) and not response.stream:
            # An event stream goes to the caller as it arrives (masking puts its own capped stream in
            # place of this one when it masks replies): at most the reply limit passes.
            encoded = bool(response.headers.get("content-encoding"))
            end_event = None if encoded else limits.sse_error_event(
                facts_of(flow).endpoint, *limits.RESPONSE_TOO_LARGE,
                limits.too_large_message("response", self.limits.response_bytes, inflated=False))
            limit = self.limits.response_bytes
            response.stream = StreamByteCap(limit, end_event, lambda: self._stream_cut(flow, limit))

    def _stream_cut(self, flow: http.HTTPFlow, limit: int) -> None:
        # Noted when it happens: the caller, told by the error event, may hang up before the stream ends.
        self._record(flow, limit_bytes=limit)
        REFUSAL.set(flow, {"status": limits.RESPONSE_TOO_LARGE[0], "code": limits.RESPONSE_TOO_LARGE[1],
                           "message": limits.too_large_message("response", limit, inflated=False)})
        flow.comment = f"stream cut {limits.RESPONSE_TOO_LARGE[0]} {limits.RESPONSE_TOO_LARGE[1]}"

    async def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is not None and isinstance(response.stream, StreamByteCap):
            self._record(flow, response_bytes=response.stream.received)
            return
        if not flow.live or response is None or REFUSAL.on(flow):
            return
        if response.stream:
            return  # streamed by another addon's callable (masking), which caps its own streams
        raw = response.raw_content or b""
        self._record(flow, response_bytes=len(raw))
        if len(raw) > self.limits.response_bytes:
            self._refuse(flow, "response", self.limits.response_bytes, inflated=False)
            return
        if not header_value(response.headers, b"content-encoding"):
            return
        decoded = await self._inflate(flow, response, "response", self.limits.response_bytes)
        if decoded is not None:
            self._record(flow, response_inflated_bytes=len(decoded))
            # Masking, key custody and the records read the decoded reply; the caller gets it plain.
            response.headers.pop("content-encoding", None)
            response.content = decoded

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and isinstance(flow.response.stream, StreamByteCap):
            self._record(flow, response_bytes=flow.response.stream.received)
        # mitmproxy's own body_size_limit stopped a body before any hook of ours could (its answer is
        # made JSON by transport_errors): recorded as the refusal it is.
        message = flow.error.msg if flow.error else ""
        if message in (limits.MITMPROXY_REQUEST_TOO_LARGE, limits.MITMPROXY_RESPONSE_TOO_LARGE) \
                and not REFUSAL.on(flow):
            direction = "request" if message == limits.MITMPROXY_REQUEST_TOO_LARGE else "response"
            status, code = limits.REQUEST_TOO_LARGE if direction == "request" else limits.RESPONSE_TOO_LARGE
            size = human.parse_size(ctx.options.body_size_limit) or 0
            self._record(flow, limit_bytes=size)
            REFUSAL.set(flow, {"status": status, "code": code,
                               "message": limits.too_large_message(direction, size, inflated=False)})
            flow.comment = f"refused {status} {code}"

    # ---- shared -------------------------------------------------------------------------------------
    async def _inflate(self, flow: http.HTTPFlow, message: http.Message, direction: str, limit: int) -> bytes | None:
        """The message's body decoded within the limit; None when it was refused instead."""
        raw = message.raw_content or b""
        try:
            codings = content_codings(message.headers.get("content-encoding", ""))
            if len(raw) <= limits.INLINE_MAX_RAW:
                try:
                    return inflate(raw, codings, min(limit, limits.INLINE_MAX_INFLATED))
                except BodyTooLarge:
                    if limit <= limits.INLINE_MAX_INFLATED:
                        raise
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._inflating, inflate, raw, codings, limit)
        except BodyTooLarge as e:
            logger.warning("%s %s%s: the %s body inflates past %d bytes (%d compressed)", flow.request.method,
                           flow.request.pretty_host, flow.request.path.split("?", 1)[0], direction, limit, len(raw))
            self._record(flow, **{f"{direction}_inflated_bytes": e.inflated})
            if direction == "request":
                _drop_body(flow.request)
            self._refuse(flow, direction, limit, inflated=True)
        except BodyUndecodable as e:
            status, code = limits.REQUEST_UNDECODABLE if direction == "request" else limits.RESPONSE_UNDECODABLE
            refuse(flow, status, code, limits.undecodable_message(direction, str(e)))
        return None

    def _refuse(self, flow: http.HTTPFlow, direction: str, limit: int, inflated: bool) -> None:
        status, code = limits.REQUEST_TOO_LARGE if direction == "request" else limits.RESPONSE_TOO_LARGE
        self._record(flow, limit_bytes=limit)
        refuse(flow, status, code, limits.too_large_message(direction, limit, inflated))

    @staticmethod
    def _record(flow: http.HTTPFlow, **sizes: int) -> None:
        record: BodyLimitsRecord = dict(BODY_LIMITS.get(flow) or {})
        record.update(sizes)
        BODY_LIMITS.set(flow, record)


addons = [BodySizeLimits()]
