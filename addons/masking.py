"""Masks personal data in replies (and, where configured, requests) with Presidio, streamed replies included."""

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from mitmproxy import exceptions, http

from auditgate.core.flow_contract import MASKING, REFUSAL, services
from auditgate.core.options import add_gateway_options, load_rules, rules_dir
from auditgate.core.refusal import is_answered, refuse
from auditgate.core.request_facts import facts_of, is_event_stream, media_type
from auditgate.masking.body import BodyNotMaskable, mask_body
from auditgate.masking.config import MaskingSettings, load_masking_settings
from auditgate.masking.engine import PiiMasker, shared_masker
from auditgate.masking.errors import describe
from auditgate.masking.payload import mask_request_payload
from auditgate.masking.stream import (
    Decoder,
    SseStreamMasker,
    StreamNotMaskable,
    TextStreamMasker,
    error_events,
    stream_decoder,
)
from auditgate.masking.workers import MaskingBusy, MaskingWorkerError, MaskingWorkers
from auditgate.websocket import session, session_control
from auditgate.websocket.events import (
    AUDIO_KEYS,
    RESPONSE_END_EVENTS,
    NotAnEvent,
    dump,
    parse,
    response_id_of,
    response_status_of,
)
from auditgate.websocket.masking import EventMasker

logger = logging.getLogger("auditgate.addons.masking")


def _one_cpu() -> bool:
    """True when this process may run on a single CPU only (asked each time: affinity can change)."""
    try:
        return len(os.sched_getaffinity(0)) == 1
    except (AttributeError, OSError):  # not on Linux
        return False


class MaskingFailed(Exception):
    """Masking could not be completed; nothing unmasked may be released."""


class MaskingQueueFull(MaskingFailed):
    """Every masking worker is busy and the line of waiting bodies is full: refused at once (503)."""


@dataclass
class _StreamState:
    sse: SseStreamMasker | None  # None: the stream failed before its masker was made
    decode: Decoder | None
    kind: str
    seconds: float = 0.0
    failed: str | None = None
    error_sent: bool = False  # the SSE error event went out; nothing more does
    callable: Callable | None = None  # what this addon set as flow.response.stream


@dataclass
class _FlowMasking:
    findings: list[tuple[str, str, str]] = field(default_factory=list)  # (entity, path, direction)
    failed: str | None = None


class PiiMasking:
    """Masks PII in JSON and text bodies (in worker processes) and in SSE streams (as they pass)."""

    def __init__(self) -> None:
        self.settings: MaskingSettings | None = None
        self.masker: PiiMasker | None = None  # in this process: streams and small bodies
        self.workers: MaskingWorkers | None = None
        self._streams: dict[str, _StreamState] = {}
        self._flows: dict[str, _FlowMasking] = {}
        self._in_flight: set[str] = set()  # flows between their request headers and their end
        self._sessions: dict[str, EventMasker] = {}  # WebSocket flows: their server events' masker

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        settings = load_rules(load_masking_settings)
        try:
            masker = shared_masker(settings) if settings else None
        except Exception as e:  # a bad recognizer file or a missing spaCy model
            raise exceptions.OptionsError(f"auditgate: masking engine could not be built: {e}") from None
        if settings and masker:
            for direction in ("response", "request"):
                unknown = set(settings.direction(direction).entities) - masker.supported
                if unknown:
                    raise exceptions.OptionsError(
                        f"auditgate: masking.yaml {direction}.entities: no recognizer for {', '.join(sorted(unknown))}"
                    )
        self._stop_workers(wait=0)  # a new configuration at run time: the loop does not wait for the old pool
        self.settings, self.masker = settings, masker
        if settings is None:
            logger.warning("PII masking is off: %s has no masking.yaml", rules_dir())
            return
        self.workers = MaskingWorkers(settings, settings.workers or os.cpu_count() or 1,
                                      queue_max=settings.queue_max_jobs)
        logger.info(
            "PII masking: responses %s, requests %s; %d worker process(es)",
            "on" if settings.response.enabled else "off", "on" if settings.request.enabled else "off",
            self.workers.count,
        )

    async def running(self) -> None:
        # Start every worker (Presidio takes a second or two to import) before serving, so the first
        # request is not the one that waits and times out.
        if self.workers is None:
            return
        try:
            await self.workers.start()
        except MaskingWorkerError as e:
            # Every body that needs a worker will be refused (fail closed); say why at once.
            logger.error("PII masking workers could not start: %s", e)
            return
        logger.info("PII masking workers ready")

    def done(self) -> None:
        self._stop_workers()

    def _stop_workers(self, wait: float = 2.0) -> None:
        if self.workers:
            self.workers.close(wait)
            self.workers = None

    # ---- requests ---------------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self._in_flight.add(flow.id)

    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow) or self.settings is None:
            return
        kind = facts_of(flow).endpoint
        mask_request = self.settings.request.enabled
        if kind == "traces":
            if self.settings.traces == "refuse":
                refuse(flow, 403, "gateway_forbidden", "trace uploads are refused by this gateway's masking policy")
                return
            mask_request = self.settings.traces == "mask"
        if self.settings.response.enabled:
            # Masking needs plain bytes; asking the upstream for them spares a decode and re-encode.
            flow.request.headers["accept-encoding"] = "identity"
        if mask_request and flow.request.raw_content:
            try:
                await self._mask_message(flow, flow.request, kind, "request")
            except Exception as e:  # escaping, it would let the request go upstream unmasked
                self._fail_unexpectedly(flow, "request", e)

    # ---- responses ----------------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live or self.settings is None or not self.settings.response.enabled or not flow.response:
            return
        if not is_event_stream(flow.response):
            return
        # From here on the stream goes through this addon's callable whatever happens: an exception
        # escaping this hook would leave flow.response.stream unset, and the next addon would stream
        # the reply through raw.
        try:
            kind = facts_of(flow).endpoint
        except Exception:
            kind = "chat" if "/chat/" in flow.request.path else "responses"
        try:
            state = _StreamState(self._new_sse_masker(), None, kind)
            state.decode = stream_decoder(flow.response.headers.get("content-encoding", ""))
        except Exception as e:  # StreamNotDecodable, or anything unexpected: the stream ends with the error event
            reason = str(e) if isinstance(e, StreamNotMaskable) else describe(e)
            if not isinstance(e, StreamNotMaskable):
                logger.error("masking a stream could not start: %s", reason)
            state = _StreamState(None, None, kind, failed=f"stream: {reason}")
        self._streams[flow.id] = state
        state.callable = functools.partial(self._stream_chunk, state)
        flow.response.stream = state.callable
        headers = flow.response.headers
        if state.decode or state.failed:
            headers.pop("content-encoding", None)  # the client gets the masked events (or the error) plain
        # The masked stream's length is not the upstream's: never pass its content-length on.
        if headers.pop("content-length", None) is not None and flow.response.http_version.startswith("HTTP/1") \
                and "transfer-encoding" not in headers:
            headers["transfer-encoding"] = "chunked"

    def _new_sse_masker(self) -> SseStreamMasker:
        masker = self.masker
        entities = masker.entities("response")
        holdback = self.settings.stream_holdback_chars
        sse: SseStreamMasker

        words = 3 if self.settings.nlp_model else 0

        def text_masker(path: str) -> TextStreamMasker:
            return TextStreamMasker(lambda text: masker.find(text, entities), masker.apply, holdback, path, words)

        def mask_sync(text: str, path: str) -> str:
            masked, found = masker.mask(text, "response")
            sse.sync_findings.extend((entity, path) for entity in found)
            return masked

        sse = SseStreamMasker(text_masker, mask_sync, self.settings.stream_event_max_bytes,
                              self.settings.stream_max_bytes)
        return sse

    def _stream_chunk(self, state: _StreamState, data: bytes) -> bytes | list[bytes]:
        # Runs inside mitmproxy's event loop for every chunk: per-delta work is a few regex searches,
        # and Presidio runs only on the small window around a trigger. Nothing it was given goes out
        # unless the masker made it: any failure ends the stream with the SSE error event.
        if state.failed:
            return self._stream_error(state)
        started = time.perf_counter()
        out: list[bytes] = []
        try:
            sse = state.sse
            if state.decode is None:
                out.append(sse.feed(data) if data else sse.finish())
            else:
                # Inflated piece by piece, each masked before the next is made: a bomb stops at the cap.
                for piece in state.decode(data):
                    out.append(sse.feed(piece))
                if not data:
                    out.append(sse.finish())
        except Exception as e:  # fail closed: end the stream with an error, release nothing raw
            if isinstance(e, StreamNotMaskable):
                state.failed = f"stream: {type(e).__name__}: {e}"
                logger.warning("a stream was ended: %s", e)
            else:
                state.failed = f"stream: {describe(e)}"
                logger.error("masking a stream failed: %s", describe(e))
            # What was masked before the failure may go out; the error event ends the stream.
            return [b"".join(out), *self._stream_error(state)] if any(out) else self._stream_error(state)
        finally:
            state.seconds += time.perf_counter() - started
        # An empty chunk would end the body mid-stream: send nothing instead.
        joined = b"".join(out)
        return joined if joined else []

    @staticmethod
    def _stream_error(state: _StreamState) -> list[bytes]:
        if state.error_sent:
            return []
        state.error_sent = True  # the error goes out once; everything after it is swallowed
        return error_events(state.kind)

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self._mask_response(flow)
        except Exception as e:
            if flow.response is not None and callable(flow.response.stream):
                # Streamed: what the client got went through the masker already; a refusal now would
                # only make the record claim an answer the client never saw. The record says it failed.
                logger.error("recording the masking of a stream failed: %s", describe(e))
                self._state(flow).failed = f"response: {describe(e)}"
                self._write_metadata(flow)
            else:
                # An error escaping this hook would let mitmproxy send the reply as it is: unmasked.
                self._fail_unexpectedly(flow, "response", e)
        finally:
            self._in_flight.discard(flow.id)

    def _fail_unexpectedly(self, flow: http.HTTPFlow, direction: str, error: Exception) -> None:
        logger.error("masking the %s failed: %s", direction, describe(error))
        self._state(flow).failed = f"{direction}: {describe(error)}"
        self._write_metadata(flow)
        refuse(flow, 502, "gateway_masking_failed", f"the {direction} could not be masked, so it was withheld")

    async def _mask_response(self, flow: http.HTTPFlow) -> None:
        if not flow.live or self.settings is None or not flow.response:
            return
        stream = self._streams.pop(flow.id, None)
        if stream is not None and flow.response.stream is stream.callable:
            self._note_stream(flow, stream)
            return
        if stream is not None and flow.response.stream and not REFUSAL.on(flow):
            # Something after this addon put its own stream in place of the masker: what went out did
            # not pass through it. Never expected in the bundle; the record must say so if it happens.
            stream.failed = "stream: the reply was streamed past the masker"
            logger.error("a stream of flow %s was streamed past the masker", flow.id)
            self._note_stream(flow, stream)
            return
        # Not streamed after all (a later hook took the stream back, so the reply was buffered): it is
        # masked whole below, like any reply, or recorded as refused.
        if REFUSAL.on(flow) or not self.settings.response.enabled:
            self._write_metadata(flow)
            return
        if await self._mask_message(flow, flow.response, facts_of(flow).endpoint, "response"):
            self._write_metadata(flow)

    def _note_stream(self, flow: http.HTTPFlow, stream: _StreamState) -> None:
        state = self._state(flow)
        if stream.sse is not None:
            state.findings += [(e, p, "response") for e, p in stream.sse.findings]
        state.failed = state.failed or stream.failed
        self._write_metadata(flow, stream_ms=round(stream.seconds * 1000, 3))

    def error(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)
        stream = self._streams.pop(flow.id, None)
        if stream is not None:  # a stream cut short (the client left, the upstream broke off): what it masked
            self._note_stream(flow, stream)
        elif flow.id in self._flows:
            self._write_metadata(flow)

    # ---- shared -----------------------------------------------------------------------------------
    async def _mask_message(self, flow: http.HTTPFlow, message: http.Message, kind: str, direction: str) -> bool:
        """Mask a request or reply body in place; False when it failed and the flow was refused instead."""
        try:
            new_body, findings = await self._mask_body(message, kind, direction)
        except MaskingFailed as e:
            self._state(flow).failed = f"{direction}: {e}"
            self._write_metadata(flow)
            what = "request could not be masked; it was not sent" if direction == "request" else \
                "reply could not be masked, so it was withheld"
            if isinstance(e, MaskingQueueFull):
                refuse(flow, 503, "gateway_masking_busy", f"the gateway's masking workers are all busy: the {what}")
            else:
                refuse(flow, 502, "gateway_masking_failed", f"the {what}")
            return False
        if new_body is not None:
            message.content = new_body
        self._state(flow).findings += [(entity, path, direction) for entity, path in findings]
        return True

    def _state(self, flow: http.HTTPFlow) -> _FlowMasking:
        return self._flows.setdefault(flow.id, _FlowMasking())

    async def _mask_body(self, message: http.Message, kind: str, direction: str) -> tuple[bytes | None, list]:
        """The masked body (None when nothing changed) and the findings as (entity, path)."""
        try:
            body = message.get_content()
        except ValueError as e:
            raise MaskingFailed(f"cannot decode the body: {e}") from None
        if not body:
            return None, []
        content_type = media_type(message.headers.get("content-type", ""))
        if len(body) <= self.settings.inline_max_bytes and not self.settings.nlp_model and (
                len(self._in_flight) <= 1 or _one_cpu()):
            # Small, pattern-only, and either no other flow is waiting on this process or this process
            # may run on one CPU only (taskset, a cgroup cpuset of one): quicker here than the round trip
            # to a worker. Workers buy parallelism on other CPUs; confined to one CPU they would run the
            # same masking on the same core, plus two pickles and two context switches per body.
            try:
                return mask_body(self.masker, body, content_type, kind, direction)
            except BodyNotMaskable as e:
                raise MaskingFailed(str(e)) from None
            except Exception as e:
                raise MaskingFailed(describe(e)) from None
        # Everything else is parsed, walked and masked by a worker process: this process, which
        # carries every flow, only hands the bytes over and takes the answer back.
        if self.workers is None:
            raise MaskingFailed("no masking workers")
        try:
            return await self.workers.mask(direction, kind, content_type, body, self.settings.timeout_seconds)
        except MaskingBusy as e:
            raise MaskingQueueFull(str(e)) from None
        except MaskingWorkerError as e:
            raise MaskingFailed(str(e)) from None
        except Exception as e:  # out of processes or descriptors...: whatever it is, nothing passes unmasked
            logger.error("masking workers failed: %s", describe(e))
            raise MaskingFailed(describe(e)) from None

    def _write_metadata(self, flow: http.HTTPFlow, **extra) -> None:
        state = self._flows.pop(flow.id, None) or _FlowMasking()
        counts: dict[tuple, int] = {}  # a Counter, without its Python-level constructor per reply
        for finding in state.findings:
            counts[finding] = counts.get(finding, 0) + 1
        findings = [
            {"entity_type": entity, "count": n, "path": path, "direction": direction}
            for (entity, path, direction), n in counts.items()
        ]
        status = "failed" if state.failed else ("masked" if findings else "clean")
        record = {"status": status, "findings": findings, **extra}
        if state.failed:
            record["reason"] = state.failed
        MASKING.set(flow, record)
        if findings:
            types: dict[str, int] = {}
            for f in findings:
                types[f["entity_type"]] = types.get(f["entity_type"], 0) + f["count"]
            total = sum(types.values())
            flow.comment = f"masked {total}: {', '.join(types)}"
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("masked %d value(s) in %s %s: %s", total, flow.request.method, flow.request.path,
                            ", ".join(f"{f['entity_type']} at {f['direction']}:{f['path']}" for f in findings))
        elif state.failed:
            flow.comment = f"masking failed: {state.failed}"


    # ---- WebSocket sessions ---------------------------------------------------------------------------
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        message = flow.websocket.messages[-1]
        if session.record(flow).get("failed"):
            return
        try:
            if session.own_kind(flow) in ("error", session.RESENT) or message.dropped:
                # The gateway's own error event, or an event it masked already and sends again itself;
                # or a client event not sent.
                session.mark(flow, "masking")
                return
            if message.from_client:
                self._mask_client_event(flow, message)
            else:
                self._mask_server_event(flow, message)
            session.mark(flow, "masking")
        except Exception as error:  # never the raw message: dropped, and the session closed
            session_control.fail(flow, "masking", error)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        masker = self._sessions.pop(flow.id, None)
        findings = session.record(flow)["findings"]
        status = "failed" if (session.record(flow).get("failed") or "").startswith("masking") else (
            "masked" if findings else "clean")
        if masker is not None or self.settings is not None:
            MASKING.set(flow, {"status": status, "findings": [
                {"entity_type": entity, "count": n, "path": "websocket", "direction": "both"}
                for entity, n in sorted(findings.items())]})

    def _mask_client_event(self, flow: http.HTTPFlow, message) -> None:
        if self.settings is None or not self.settings.request.enabled:
            return
        try:
            event = parse(message.content, message.is_text)
        except NotAnEvent:
            return  # policy refused it already: it is dropped, never sent
        found: list[str] = []

        def mask(text: str, path: str) -> str:
            masked, entities = self.masker.mask(text, "request")
            found.extend(entities)
            return masked

        audio = {k: event[k] for k in AUDIO_KEYS if isinstance(event.get(k), str)}
        masked = mask_request_payload({k: v for k, v in event.items() if k not in audio}, "responses", mask)
        if found:
            message.content = dump({**masked, **audio})
            self._note_masked(flow, Counter(found))

    def _mask_server_event(self, flow: http.HTTPFlow, message) -> None:
        masking = self.settings is not None and self.settings.response.enabled
        if not message.is_text:
            if masking:
                raise NotAnEvent("a binary server message, which the gateway cannot read")
            return
        try:
            event = parse(message.content)
        except NotAnEvent:
            if masking:
                # Not an event: masked as one text, so nothing unknown passes unexamined.
                text, found = self.masker.mask(message.content.decode("utf-8", "replace"), "response")
                if found:
                    message.content = text.encode()
                    self._note_masked(flow, Counter(found))
            return
        masker = self._sessions.get(flow.id)
        if masking:
            if masker is None:
                masker = self._sessions[flow.id] = self._new_event_masker()
            before = Counter(masker.findings)
            masked = masker.mask(event)
            if masked != [event]:
                # A delta may carry less, or nothing; an event ending a text stream comes after its held tail.
                session.set_events(flow, [dump(e) for e in masked])
            if masker.findings != before:
                self._note_masked(flow, masker.findings - before)
        if event["type"] in RESPONSE_END_EVENTS:
            found, messages = masker.end_response() if masker is not None else (Counter(), 0)
            status = ("masked" if found else "clean") if masking else "off"
            self._response_done(flow, event, status, found, messages)

    def _new_event_masker(self) -> EventMasker:
        masker = self.masker
        entities = masker.entities("response")
        holdback = self.settings.stream_holdback_chars
        words = 3 if self.settings.nlp_model else 0

        def text_masker(path: str) -> TextStreamMasker:
            return TextStreamMasker(lambda text: masker.find(text, entities), masker.apply, holdback, path, words)

        return EventMasker(text_masker, lambda text, path: masker.mask(text, "response"))

    @staticmethod
    def _note_masked(flow: http.HTTPFlow, found: Counter) -> None:
        session.record(flow)["masked"] += 1
        session.add_findings(flow, found)

    @staticmethod
    def _response_done(flow: http.HTTPFlow, event: dict, status: str, found: Counter, messages: int) -> None:
        rec = session.record(flow)
        rec["responses"] += 1
        events = services.audit_events
        if events is None:
            return
        events.append_event("websocket_response", {
            "flow_id": flow.id, "response_id": response_id_of(event), "status": response_status_of(event),
            "masking": {"status": status, "findings": dict(sorted(found.items()))}, "messages": messages})


addons = [PiiMasking()]
