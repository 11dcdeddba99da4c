"""Masks personal data in replies (and, where configured, requests) with Presidio, streamed replies included."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from mitmproxy import exceptions, http

from addons.gateway_options import add_gateway_options, load_rules, rules_dir
from addons.masking_config import MaskingSettings, load_masking_settings
from addons.openai_errors import error_body, is_answered, refuse
from addons.payload_masking import endpoint_kind, mask_request_payload, mask_response_payload
from addons.pii_masking import PiiMasker, init_worker, mask_texts_in_worker, worker_ready
from addons.sse_streaming import is_event_stream
from addons.stream_masking import SseStreamMasker, TextStreamMasker

logger = logging.getLogger(__name__)

METADATA_KEY = "auditgate.masking"


class MaskingFailed(Exception):
    """Masking could not be completed; nothing unmasked may be released."""


@dataclass
class _StreamState:
    sse: SseStreamMasker
    decode: Callable[[bytes], bytes] | None
    kind: str
    seconds: float = 0.0
    failed: str | None = None
    events_out: int = 0


@dataclass
class _FlowMasking:
    findings: list[tuple[str, str, str]] = field(default_factory=list)  # (entity, path, direction)
    failed: str | None = None


def _stream_decoder(encoding: str) -> Callable[[bytes], bytes] | None:
    """An incremental decoder for a streamed body's content-encoding (stream callables see it encoded)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # 32: accept gzip or zlib headers
        return lambda data: d.decompress(data) if data else d.flush()
    if encoding == "br":
        import brotli

        b = brotli.Decompressor()
        return lambda data: b.process(data) if data else b""
    if encoding == "zstd":
        import zstandard

        z = zstandard.ZstdDecompressor().decompressobj()
        return lambda data: z.decompress(data) if data else b""
    raise MaskingFailed(f"cannot decode a streamed body with content-encoding {encoding!r}")


class PiiMasking:
    """Masks PII in JSON and text bodies (in a process pool) and in SSE streams (as they pass)."""

    def __init__(self) -> None:
        self.settings: MaskingSettings | None = None
        self.masker: PiiMasker | None = None  # in this process: streams and small leftovers
        self.pool: ProcessPoolExecutor | None = None
        self._streams: dict[str, _StreamState] = {}
        self._flows: dict[str, _FlowMasking] = {}
        self._in_flight: set[str] = set()  # flows between their request and their end

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        settings = load_rules(load_masking_settings)
        try:
            masker = PiiMasker(settings) if settings else None
        except Exception as e:  # a bad recognizer file or a missing spaCy model
            raise exceptions.OptionsError(f"auditgate: masking engine could not be built: {e}") from None
        if settings and masker:
            for direction in ("response", "request"):
                unknown = set(settings.direction(direction).entities) - masker.supported
                if unknown:
                    raise exceptions.OptionsError(
                        f"auditgate: masking.yaml {direction}.entities: no recognizer for {', '.join(sorted(unknown))}"
                    )
        self._stop_pool()
        self.settings, self.masker = settings, masker
        if settings is None:
            logger.warning("PII masking is off: %s has no masking.yaml", rules_dir())
            return
        workers = settings.workers or os.cpu_count() or 1
        # spawn, not fork: mitmproxy runs threads and an event loop that a forked child must not inherit.
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker, initargs=(settings,),
        )
        logger.info(
            "PII masking: responses %s, requests %s; %d worker process(es)",
            "on" if settings.response.enabled else "off", "on" if settings.request.enabled else "off", workers,
        )

    async def running(self) -> None:
        # Start every worker (Presidio takes a second or two to import) before serving, so the first
        # request is not the one that waits and times out.
        if self.pool is None:
            return
        loop = asyncio.get_running_loop()
        workers = self.pool._max_workers
        await asyncio.gather(*(loop.run_in_executor(self.pool, worker_ready, 0.3) for _ in range(workers)))
        logger.info("PII masking workers ready")

    def done(self) -> None:
        self._stop_pool()

    def _stop_pool(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    # ---- requests ---------------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self._in_flight.add(flow.id)

    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow) or self.settings is None:
            return
        kind = endpoint_kind(flow.request.path)
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
            await self._mask_message(flow, flow.request, kind, "request")

    # ---- responses --------------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live or self.settings is None or not self.settings.response.enabled or not flow.response:
            return
        if not is_event_stream(flow.response):
            return
        try:
            decode = _stream_decoder(flow.response.headers.get("content-encoding", ""))
        except MaskingFailed as e:
            self._state(flow).failed = str(e)
            decode = None
        if decode or self._state(flow).failed:
            # The client gets the masked events (or our error event) uncompressed.
            flow.response.headers.pop("content-encoding", None)
            flow.response.headers.pop("content-length", None)
        state = _StreamState(self._new_sse_masker(flow), decode, endpoint_kind(flow.request.path))
        if self._state(flow).failed:
            state.failed = self._state(flow).failed
        self._streams[flow.id] = state
        flow.response.stream = lambda data: self._stream_chunk(state, data)

    def _new_sse_masker(self, flow: http.HTTPFlow) -> SseStreamMasker:
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

        sse = SseStreamMasker(text_masker, mask_sync)
        return sse

    def _stream_chunk(self, state: _StreamState, data: bytes) -> bytes | list[bytes]:
        # Runs inside mitmproxy's event loop for every chunk: per-delta work is a few regex searches,
        # and Presidio runs only on the small window around a trigger.
        if state.failed:
            return self._stream_error(state)
        started = time.perf_counter()
        try:
            if data:
                out = state.sse.feed(state.decode(data) if state.decode else data)
            else:
                tail = state.sse.feed(state.decode(b"")) if state.decode else b""
                out = tail + state.sse.finish()
        except Exception as e:  # fail closed: end the stream with an error, release nothing raw
            logger.error("masking a stream failed: %s", e, exc_info=True)
            state.failed = f"stream: {type(e).__name__}: {e}"
            return self._stream_error(state)
        finally:
            state.seconds += time.perf_counter() - started
        # An empty chunk would end the body mid-stream: send nothing instead.
        return out if out else []

    @staticmethod
    def _stream_error(state: _StreamState) -> list[bytes]:
        if state.events_out < 0:
            return []
        state.events_out = -1  # the error goes out once; everything after it is swallowed
        message = "the gateway could not mask this stream, so it was ended"
        # The openai SDK raises APIError for a streamed event whose data holds an "error" object;
        # Responses API clients also know the "error" event type.
        error = json.loads(error_body(502, "gateway_masking_failed", message))
        if state.kind == "chat":
            return [f"data: {json.dumps(error)}\n\n".encode()]
        event = {"type": "error", "code": "gateway_masking_failed", "message": message, "param": None, **error}
        return [f"event: error\ndata: {json.dumps(event)}\n\n".encode()]

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            await self._mask_response(flow)
        finally:
            self._in_flight.discard(flow.id)

    async def _mask_response(self, flow: http.HTTPFlow) -> None:
        if not flow.live or self.settings is None or not flow.response:
            return
        stream = self._streams.pop(flow.id, None)
        if stream is not None:
            state = self._state(flow)
            state.findings += [(e, p, "response") for e, p in stream.sse.findings]
            state.failed = state.failed or stream.failed
            self._write_metadata(flow, stream_ms=round(stream.seconds * 1000, 3))
            return
        if "auditgate.refusal" in flow.metadata or not self.settings.response.enabled:
            self._write_metadata(flow)
            return
        if await self._mask_message(flow, flow.response, endpoint_kind(flow.request.path), "response"):
            self._write_metadata(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)
        self._streams.pop(flow.id, None)
        if flow.id in self._flows:
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
        entities = self.masker.entities(direction)
        try:
            body = message.get_content()
        except ValueError as e:
            raise MaskingFailed(f"cannot decode the body: {e}") from None
        if not body:
            return None, []
        content_type = message.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            if content_type.startswith("text/") or "json" in content_type:
                raise MaskingFailed("a text body that is not UTF-8") from None
            return None, []  # binary (audio, images): nothing to mask as text
        if "json" in content_type or (not content_type and text.lstrip()[:1] in "{["):
            try:
                payload = json.loads(text)
            except ValueError:
                payload = None
            if payload is not None:
                walk = mask_response_payload if direction == "response" else mask_request_payload
                candidates: dict[str, str] = {}

                def collect(value: str, path: str) -> str:
                    if self.masker.may_contain(value, entities):
                        candidates[path] = value
                    return value

                walk(payload, kind, collect)
                if not candidates:
                    return None, []
                results = await self._in_pool(direction, list(candidates.values()))
                masked = dict(zip(candidates, results))
                new_payload = walk(payload, kind, lambda value, path: masked[path][0] if path in masked else value)
                findings = [(entity, path) for path, (_, found) in masked.items() for entity in found]
                if not findings:
                    return None, []
                return json.dumps(new_payload, ensure_ascii=False).encode(), findings
        if not (content_type.startswith("text/") or "json" in content_type or not content_type):
            return None, []
        if not self.masker.may_contain(text, entities):
            return None, []
        [(masked_text, found)] = await self._in_pool(direction, [text])
        return (masked_text.encode() if found else None), [(entity, "body") for entity in found]

    async def _in_pool(self, direction: str, texts: list[str]) -> list[tuple[str, list[str]]]:
        if sum(map(len, texts)) <= self.settings.inline_max_chars and len(self._in_flight) <= 1:
            # Small, and no other flow is waiting on this process: cheaper here than the round trip
            # to a worker. With other flows in flight the workers take it, so those flows keep moving.
            try:
                return [self.masker.mask(text, direction) for text in texts]
            except Exception as e:
                raise MaskingFailed(f"{type(e).__name__}: {e}") from None
        if self.pool is None:
            raise MaskingFailed("no masking workers")
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self.pool, mask_texts_in_worker, direction, texts), self.settings.timeout_seconds
            )
        except TimeoutError:
            raise MaskingFailed(f"timed out after {self.settings.timeout_seconds:g}s") from None
        except Exception as e:
            raise MaskingFailed(f"{type(e).__name__}: {e}") from None

    def _write_metadata(self, flow: http.HTTPFlow, **extra) -> None:
        state = self._flows.pop(flow.id, None) or _FlowMasking()
        counts = Counter(state.findings)
        findings = [
            {"entity_type": entity, "count": n, "path": path, "direction": direction}
            for (entity, path, direction), n in counts.items()
        ]
        status = "failed" if state.failed else ("masked" if findings else "clean")
        record = {"status": status, "findings": findings, **extra}
        if state.failed:
            record["reason"] = state.failed
        flow.metadata[METADATA_KEY] = record
        if findings:
            types = Counter()
            for f in findings:
                types[f["entity_type"]] += f["count"]
            total = sum(types.values())
            flow.comment = f"masked {total}: {', '.join(types)}"
            logger.debug("masked %d value(s) in %s %s: %s", total, flow.request.method, flow.request.path,
                        ", ".join(f"{f['entity_type']} at {f['direction']}:{f['path']}" for f in findings))
        elif state.failed:
            flow.comment = f"masking failed: {state.failed}"


addons = [PiiMasking()]
