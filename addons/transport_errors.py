"""Makes mitmproxy's own transport errors OpenAI-shaped JSON, and gives up on an upstream that takes too long.

Transport errors (upstream down, bad request, a body over mitmproxy's body_size_limit) are answered by
mitmproxy itself with an HTML page; here they become OpenAI-shaped JSON. Upstream timeouts (connect,
first byte, idle) live here too: they are transport failures, answered on the same error path or
ended the same way, and this addon is the first of the bundle, so its request hook starts the watch
before any other runs and its response hook turns a timed-out reply into the refusal before any
other addon sees it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.layers.http import _http1, _http2
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from auditgate.core.errors import error_body
from auditgate.core.flow_contract import REFUSAL, REQUEST_READY
from auditgate.core.refusal import error_response, is_answered, refuse
from auditgate.core.request_facts import facts_of, is_event_stream
from auditgate.transport import limits, timeouts, upstream_control
from auditgate.transport.timeouts import Exchange, UpstreamTimeouts

logger = logging.getLogger("auditgate.addons.transport_errors")

# mitmproxy answers transport failures (connect refused, TLS failure, a body over body_size_limit)
# from inside its HTTP layers with an HTML page and offers no hook to change it; the openai SDK would
# then raise an error with no code. These two module-level functions are the only places that page is
# built, so we swap them while this addon is loaded and restore them when it is unloaded.
_CODES = {400: "gateway_bad_request", 413: limits.REQUEST_TOO_LARGE[1], 502: "gateway_upstream_unavailable",
          504: "gateway_upstream_unavailable"}


def _status_code_message(status_code: int, message: str) -> tuple[int, str, str, bool]:
    """The status, code and message of the answer, and whether it is final (the SDK should not retry it)."""
    timed_out = timeouts.unmarked(message)
    if timed_out is not None:
        return timeouts.STATUS, timeouts.CODE, timed_out, True
    if message == limits.MITMPROXY_RESPONSE_TOO_LARGE:
        return status_code, limits.RESPONSE_TOO_LARGE[1], "the reply body is larger than this gateway passes on", True
    if message == limits.MITMPROXY_REQUEST_TOO_LARGE:
        return status_code, limits.REQUEST_TOO_LARGE[1], "the request body is larger than this gateway accepts", True
    code = _CODES.get(status_code, "gateway_error")
    if code == "gateway_upstream_unavailable":
        message = f"the upstream API could not be reached through the gateway: {message}"
    return status_code, code, message, False


def _json_error(status_code: int, message: str = "") -> bytes:
    status_code, code, message, _ = _status_code_message(status_code, message)
    return error_body(status_code, code, message)


def _make_error_response(status_code: int, message: str = "") -> bytes:
    from mitmproxy.net.http import http1

    status_code, code, message, final = _status_code_message(status_code, message)
    headers = {"content-type": "application/json", "connection": "close", "x-request-id": "req_gw_transport"}
    if final:
        headers["x-should-retry"] = "false"  # as for every refusal: retrying would only wait, or send it all, again
    response = http.Response.make(status_code, error_body(status_code, code, message), headers)
    return http1.assemble_response(response)


TIMEOUT_OPTIONS = ("gateway_upstream_connect_timeout_ms", "gateway_upstream_first_byte_timeout_ms",
                   "gateway_upstream_idle_timeout_ms")


class OpenAIShapedTransportErrors:
    """Answers mitmproxy's transport errors as OpenAI-shaped JSON; answers an upstream that times out with a 504."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, Callable]] = []
        self.timeouts: UpstreamTimeouts | None = None
        # flow id → the flow and what is known of its exchange with the upstream (first request hook to end)
        self._watches: dict[str, tuple[http.HTTPFlow, Exchange]] = {}
        self._connects: dict[str, ServerConnectionHookData] = {}  # server connection id → a connect in progress
        self._timed_out: dict[str, str] = {}  # flow id → why, for the hook that completes the refusal
        self._ending: dict[str, tuple[http.HTTPFlow, float]] = {}  # flow id → (flow, by when it must have ended)
        self._clock: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_upstream_connect_timeout_ms", int, 10_000,
            "Give up connecting to the upstream after this many milliseconds: 504 gateway_upstream_timeout.")
        loader.add_option(
            "gateway_upstream_first_byte_timeout_ms", int, 120_000,
            "Give up on an upstream that has not begun its reply this many milliseconds after the request left "
            "(504 gateway_upstream_timeout); time a request waits for approval does not count.")
        loader.add_option(
            "gateway_upstream_idle_timeout_ms", int, 60_000,
            "Give up on a reply (a stream included) whose upstream has sent nothing for this many milliseconds: "
            "504 gateway_upstream_timeout, or a stream ended with an SSE error event.")
        for module, name, replacement in (
            (_http1, "make_error_response", _make_error_response),
            (_http2, "format_error", _json_error),
        ):
            self._saved.append((module, name, getattr(module, name)))
            setattr(module, name, replacement)

    def configure(self, updated: set[str]) -> None:
        if updated & set(TIMEOUT_OPTIONS):
            try:
                self.timeouts = UpstreamTimeouts(*(getattr(ctx.options, name) / 1000 for name in TIMEOUT_OPTIONS))
            except ValueError as e:
                raise exceptions.OptionsError(f"auditgate: {e}") from None
        missing = upstream_control.missing_internals()
        if missing:
            # Without them no timeout could be enforced, and a silent upstream would hold flows forever.
            raise exceptions.OptionsError(
                "auditgate: upstream timeouts need mitmproxy internals this mitmproxy lacks: " + ", ".join(missing))

    def running(self) -> None:
        # With mitmproxy's default "eager" strategy a reverse proxy dials the upstream as soon as a
        # client connects, and a failure drops the client connection with no HTTP answer at all (the
        # SDK then retries blindly). Lazy dialling happens per request, after the gateway has
        # authenticated the caller, so a failure reaches the client as the JSON error above.
        ctx.options.update(connection_strategy="lazy")
        if self._clock is None:
            self._clock = asyncio.get_running_loop().create_task(self._watch_forever(), name="upstream timeouts")

    def done(self) -> None:
        for module, name, original in self._saved:
            setattr(module, name, original)
        self._saved.clear()
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    # ---- the flows and connections watched -----------------------------------------------------------
    def request(self, flow: http.HTTPFlow) -> None:
        # The first request hook of the bundle: the watch begins before any other hook can hold the flow.
        if flow.live and not is_answered(flow):
            self._watches[flow.id] = (flow, Exchange())

    def server_connect(self, data: ServerConnectionHookData) -> None:
        self._connects[data.server.id] = data

    def server_connected(self, data: ServerConnectionHookData) -> None:
        self._connects.pop(data.server.id, None)

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        self._connects.pop(data.server.id, None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._watches.pop(flow.id, None)
        self._ending.pop(flow.id, None)
        why = self._timed_out.pop(flow.id, None)
        if why is not None and flow.response is not None and not flow.response.stream:
            # What came of the reply (nothing, or a part) is replaced before any other response hook runs.
            refuse(flow, timeouts.STATUS, timeouts.CODE, why)
            flow.response.headers["connection"] = "close"  # see upstream_control.end_reply

    def error(self, flow: http.HTTPFlow) -> None:
        self._watches.pop(flow.id, None)
        self._ending.pop(flow.id, None)
        why = self._timed_out.pop(flow.id, None)
        if why is None and flow.error is not None:
            why = timeouts.unmarked(flow.error.msg)  # a connect timeout, reported by mitmproxy's error path
        if why is not None and not REFUSAL.on(flow):
            REFUSAL.set(flow, {"status": timeouts.STATUS, "code": timeouts.CODE, "message": why})
            flow.comment = f"refused {timeouts.STATUS} {timeouts.CODE}"

    # ---- the clocks ----------------------------------------------------------------------------------
    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.timeouts.tick if self.timeouts else 1.0)
            try:
                await self._check(time.time())
            except Exception:  # the watch must outlive any one flow's trouble
                logger.exception("checking upstream timeouts failed")

    async def _check(self, now: float) -> None:
        if self.timeouts is None:
            return
        for server_id, data in list(self._connects.items()):
            # timestamp_start is set when the TCP connect itself begins (not while queued behind others).
            if timeouts.connect_overdue(data.server.timestamp_start, self.timeouts, now):
                self._connects.pop(server_id, None)
                why = timeouts.message("connect", self.timeouts.connect)
                logger.warning("upstream %s: %s", data.server.address, why)
                upstream_control.cancel_connect(data.client, data.server, timeouts.marked(why))
        for flow_id, (flow, exchange) in list(self._watches.items()):
            if not flow.live or REFUSAL.on(flow) or flow.error is not None:
                self._watches.pop(flow_id, None)  # ended, or answered by the gateway itself: no upstream to wait on
                continue
            if exchange.sent is None:
                exchange.sent = REQUEST_READY.get(flow)  # the last request hook's mark: the request has left
            response = flow.response
            if response is not None:
                exchange.headers = response.timestamp_start
                exchange.done = response.timestamp_end is not None
                exchange.activity = upstream_control.last_activity(flow.client_conn)
            overdue = timeouts.overdue(exchange, self.timeouts, now)
            if overdue is not None:
                self._watches.pop(flow_id, None)
                self._ending[flow_id] = (flow, now + 2 * self.timeouts.tick + 1.0)
                try:
                    await self._give_up(flow, overdue.message)
                except Exception:
                    logger.exception("ending a timed-out flow failed")
                    self._ending[flow_id] = (flow, now)
        for flow_id, (flow, deadline) in list(self._ending.items()):
            if not flow.live or flow.error is not None or (flow.response and flow.response.timestamp_end):
                self._ending.pop(flow_id, None)
            elif now >= deadline:
                # Still waiting, whatever went wrong in ending it (mitmproxy's state for this connection, say):
                # the connections go, so neither the caller nor the gateway waits on it any longer.
                self._ending.pop(flow_id, None)
                logger.error("a timed-out flow did not end; closing its connections")
                upstream_control.close_upstream(flow)
                upstream_control.close_client(flow)

    async def _give_up(self, flow: http.HTTPFlow, why: str) -> None:
        logger.warning("%s %s%s: %s", flow.request.method, flow.request.pretty_host,
                       flow.request.path.split("?", 1)[0], why)
        self._timed_out[flow.id] = why  # for the response or error hook that completes the refusal
        found = upstream_control.find_stream(flow)
        if found is None:
            # An HTTP/2 upstream: its connection is closed, mitmproxy's error path answers (502 JSON),
            # and the error hook records the timeout.
            upstream_control.close_upstream(flow)
            return
        stream, tunneled = found
        response = flow.response
        streamed = response is not None and bool(response.stream)
        if tunneled:
            # Inside a CONNECT tunnel: the flow fails with the timeout (504 JSON by the error page
            # above, or, for a reply already streaming, its connection cut: an incomplete body).
            await upstream_control.fail_reply(flow, stream.stream_id, timeouts.marked(why))
            return
        if not streamed:
            # Nothing has gone to the client yet: the reply is ended here, and this addon's response
            # hook answers 504 in its place.
            placeholder = error_response(timeouts.STATUS, timeouts.CODE, why) if response is None else None
            await upstream_control.end_reply(flow, headers=placeholder)
            return
        # A reply streamed through: its head and part of its body are out. An event stream ends with the
        # SSE error event the openai SDK raises on; anything else (or a compressed stream, where a plain
        # event would be garbage) is cut, so the client sees an incomplete body, never a complete one.
        REFUSAL.set(flow, {"status": timeouts.STATUS, "code": timeouts.CODE, "message": why})
        flow.comment = f"refused {timeouts.STATUS} {timeouts.CODE}"
        response.headers["connection"] = "close"
        if is_event_stream(response) and "content-encoding" not in response.headers:
            event = limits.sse_error_event(facts_of(flow).endpoint, timeouts.STATUS, timeouts.CODE, why)
            await upstream_control.end_reply(flow, data=event)
        else:
            await upstream_control.fail_reply(flow, stream.stream_id, timeouts.marked(why))


addons = [OpenAIShapedTransportErrors()]
