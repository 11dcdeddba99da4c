"""Masks streamed replies as they pass: text deltas with a bounded hold-back, OpenAI SSE events kept valid."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from typing import Any

from auditgate.core.errors import error_body
from auditgate.masking.engine import Span
from auditgate.masking.payload import MaskFn, mask_leaves, mask_output_item

FindFn = Callable[[str], list[Span]]
ApplyFn = Callable[[str, list[Span]], str]

# The tail of unreleased text that could still grow into an entity: the current unbroken word (an
# email, key or address in progress) and, before it, groups that could belong to a spaced number,
# card or IBAN ("+1 415 555", "DE89 3704", "GB82 WEST 1234").
_GROWING_TAIL = re.compile(r"(?:(?:[A-Za-z]{2}\d{2}|[\dA-Z()+\-./]+)[ \t]+)*\S*\Z")


class TextStreamMasker:
    """Masks one text stream delta by delta; its output always equals masking the whole text at once."""

    def __init__(self, find: FindFn, apply: ApplyFn, holdback: int = 64, path: str = "", holdback_words: int = 0) -> None:
        self._find, self._apply = find, apply
        self.holdback = holdback
        # With an NER model, names span words ("Jane Roe"): hold back that many whole words too.
        self.holdback_words = holdback_words
        self.path = path
        self._context = ""  # the last raw characters already released: left context for the patterns
        self._pending = ""  # raw text not yet released
        self._masked: list[str] = []
        self.findings: list[str] = []  # entity types, one per finding

    @property
    def masked_text(self) -> str:
        """Everything released so far, masked: what the client has seen."""
        return "".join(self._masked)

    @property
    def held(self) -> int:
        return len(self._pending)

    def feed(self, delta: str) -> str:
        self._pending += delta
        match = _GROWING_TAIL.search(self._pending)
        hold_from = match.start() if match else len(self._pending)
        for _ in range(self.holdback_words):
            previous = self._pending.rstrip()[:hold_from].rstrip()
            hold_from = max(previous.rfind(" "), previous.rfind("\n")) + 1 if previous else 0
        hold_from = max(hold_from, len(self._pending) - self.holdback)
        return self._release(hold_from) if hold_from > 0 else ""

    def finish(self) -> str:
        return self._release(len(self._pending), final=True) if self._pending else ""

    def _release(self, upto: int, final: bool = False) -> str:
        window = self._context + self._pending
        offset = len(self._context)
        boundary = offset + upto
        spans = self._find(window)
        # Never cut an entity in two: move the boundary back to the start of any entity across it,
        # or of one that reaches the end of the text so far (it may still grow: a key, a PEM block).
        moved = True
        while moved:
            moved = False
            for span in spans:
                growing = not final and span.end >= len(window)
                if span.start >= offset and span.start < boundary and (span.end > boundary or growing):
                    boundary, moved = span.start, True
        if boundary <= offset:
            return ""
        released = window[offset:boundary]
        inside = [
            Span(s.entity_type, max(s.start, offset) - offset, min(s.end, boundary) - offset, s.score)
            for s in spans
            if s.end > offset and s.start < boundary
        ]
        masked = self._apply(released, inside)
        self.findings += [s.entity_type for s in inside]
        self._masked.append(masked)
        self._context = (self._context + released)[-max(self.holdback, 64):]
        self._pending = window[boundary:]
        return masked


# Deltas that are not text (base64 audio): passed untouched.
_NOT_TEXT = frozenset({"response.audio"})
# The field of a ".done" event that repeats its stream's whole text.
_DONE_FIELDS = ("text", "arguments", "refusal", "transcript", "input", "code")


class SseStreamMasker:
    """Masks an OpenAI server-sent event stream (Responses API or Chat Completions) event by event."""

    def __init__(self, new_text_masker: Callable[[str], TextStreamMasker], mask_sync: MaskFn) -> None:
        self._new_text_masker = new_text_masker
        self._mask_sync = mask_sync
        self._buffer = b""
        self._channels: dict[tuple, TextStreamMasker] = {}
        self._templates: dict[tuple, dict] = {}
        self._masked_items: dict[str, Any] = {}
        self._next_seq: int | None = None
        self._chat_shape: dict = {"object": "chat.completion.chunk"}
        self.sync_findings: list[tuple[str, str]] = []

    # ---- framing ----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        self._buffer += data.replace(b"\r\n", b"\n")
        out = []
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            out.append(self._event(block))
        return b"".join(out)

    def finish(self) -> bytes:
        out = [self.feed(b"\n\n")] if self._buffer.strip() else []
        out += [self._flush_all_responses(), self._flush_all_chat(None)]
        return b"".join(out)

    @property
    def findings(self) -> list[tuple[str, str]]:
        found = list(self.sync_findings)
        for channel in self._channels.values():
            found += [(entity, channel.path) for entity in channel.findings]
        return found

    def _event(self, block: bytes) -> bytes:
        name, data_lines, other = None, [], []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data_lines.append(line[5:].removeprefix(b" "))
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line:
                other.append(line)  # comments, id:, retry:
        if not data_lines:
            return block + b"\n\n"
        data = b"\n".join(data_lines)
        if data.strip() == b"[DONE]":
            return self._flush_all_chat(None) + block + b"\n\n"
        try:
            payload = json.loads(data)
        except ValueError:
            # Not JSON: mask it as text, so nothing unknown passes unexamined.
            return self._serialize(name, other, self._mask_sync(data.decode("utf-8", "replace"), "event"))
        if isinstance(payload, dict) and payload.get("object") == "chat.completion.chunk":
            return self._chat_chunk(name, other, payload)
        if isinstance(payload, dict) and isinstance(payload.get("type"), str):
            return b"".join(self._serialize(name and e.get("type", name), other, e) for e in self._responses_event(payload))
        return self._serialize(name, other, mask_leaves(payload, "event", self._mask_sync))

    @staticmethod
    def _serialize(name: str | None, other: list[bytes], payload: Any) -> bytes:
        lines = list(other)
        if name:
            lines.append(f"event: {name}".encode())
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        lines += [b"data: " + line.encode() for line in text.split("\n")]
        return b"\n".join(lines) + b"\n\n"

    def _channel(self, key: tuple, path: str) -> TextStreamMasker:
        if key not in self._channels:
            self._channels[key] = self._new_text_masker(path)
        return self._channels[key]

    # ---- Responses API ----------------------------------------------------------------------------
    def _number(self, event: dict) -> dict:
        # Events we add shift the numbering: renumber the whole stream so it stays contiguous.
        if "sequence_number" in event:
            if self._next_seq is None:
                self._next_seq = event["sequence_number"]
            event["sequence_number"] = self._next_seq
            self._next_seq += 1
        return event

    @staticmethod
    def _key(event: dict, base: str) -> tuple:
        index = event.get("content_index", event.get("summary_index", 0))
        return (base, event.get("item_id", event.get("output_index")), index)

    @staticmethod
    def _path(event: dict, base: str) -> str:
        short = base.removeprefix("response.")
        return f"output[{event.get('output_index', '?')}].{short}[{event.get('content_index', event.get('summary_index', 0))}]"

    def _flush(self, key: tuple) -> list[dict]:
        """Release a channel's held tail as one more delta event (numbered like the rest)."""
        channel = self._channels.get(key)
        tail = channel.finish() if channel else ""
        if not tail:
            return []
        return [self._number(dict(self._templates[key], delta=tail))]

    def _flush_all_responses(self) -> bytes:
        out = []
        for key in list(self._channels):
            if key[0].startswith("response.") and key in self._templates:
                out += [self._serialize(e["type"], [], e) for e in self._flush(key)]
        return b"".join(out)

    def _masked_channel_text(self, key: tuple, text: str, path: str) -> tuple[list[dict], str]:
        """(delta events to emit first, the channel's whole masked text) for a field that repeats it."""
        if key in self._channels:
            events = self._flush(key)
            return events, self._channels[key].masked_text
        masked = self._mask_sync(text, path)  # no deltas were seen for it: mask the whole text now
        return [], masked

    def _responses_event(self, event: dict) -> list[dict]:
        kind = event["type"]
        if kind.endswith(".delta") and isinstance(event.get("delta"), str):
            base = kind[: -len(".delta")]
            if base in _NOT_TEXT:
                return [self._number(event)]
            key = self._key(event, base)
            self._templates[key] = {k: v for k, v in event.items() if k != "delta"}
            event["delta"] = self._channel(key, self._path(event, base)).feed(event["delta"])
            return [self._number(event)]
        if kind.endswith(".done") and kind not in ("response.content_part.done", "response.output_item.done",
                                                   "response.reasoning_summary_part.done"):
            base = kind[: -len(".done")]
            field = next((f for f in _DONE_FIELDS if isinstance(event.get(f), str)), None)
            if field is None or base in _NOT_TEXT:
                return [self._number(event)]
            before, event[field] = self._masked_channel_text(self._key(event, base), event[field], self._path(event, base))
            return before + [self._number(event)]
        if kind in ("response.content_part.done", "response.reasoning_summary_part.done",
                    "response.content_part.added", "response.reasoning_summary_part.added"):
            part = event.get("part")
            before: list[dict] = []
            if isinstance(part, dict):
                part = dict(part)
                field = next((f for f in _DONE_FIELDS if isinstance(part.get(f), str)), None)
                if field and kind.endswith(".done"):
                    base = {"refusal": "response.refusal", "reasoning_text": "response.reasoning_text",
                            "summary_text": "response.reasoning_summary_text"}.get(part.get("type"),
                                                                                  "response.output_text")
                    before, part[field] = self._masked_channel_text(self._key(event, base), part[field],
                                                                    self._path(event, base))
                elif field and part[field]:
                    part[field] = self._mask_sync(part[field], self._path(event, "part"))
                event["part"] = part
            return before + [self._number(event)]
        if kind in ("response.output_item.done", "response.output_item.added"):
            before, event["item"] = self._mask_item(event.get("item"), event.get("output_index", 0))
            return before + [self._number(event)]
        if kind in ("response.completed", "response.incomplete", "response.failed",
                    "response.created", "response.in_progress", "response.queued"):
            response = event.get("response")
            before = []
            if isinstance(response, dict) and isinstance(response.get("output"), list):
                output = []
                for i, item in enumerate(response["output"]):
                    item_id = item.get("id") if isinstance(item, dict) else None
                    if item_id in self._masked_items:
                        output.append(self._masked_items[item_id])
                    else:
                        flushed, masked = self._mask_item(item, i)
                        before += flushed
                        output.append(masked)
                event["response"] = dict(response, output=output)
            return before + [self._number(event)]
        if kind == "error" or kind.startswith("response.output_text.annotation"):
            return [self._number(event)]
        # An event type we do not know: every string leaf is masked; nothing passes unexamined.
        return [self._number(mask_leaves(event, "event", self._mask_sync))]

    def _mask_item(self, item: Any, output_index: int) -> tuple[list[dict], Any]:
        """An output item with each text field replaced by its channel's masked text (flushing first)."""
        if not isinstance(item, dict):
            return [], item
        before: list[dict] = []
        item_id = item.get("id")
        path = f"output[{output_index}]"

        def from_channel(base: str, index: int, text: str, field_path: str) -> str:
            key = (base, item_id if item_id is not None else output_index, index)
            if key in self._channels:
                before.extend(self._flush(key))
                return self._channels[key].masked_text
            return self._mask_sync(text, field_path) if text else text

        masked = dict(item)
        kind = item.get("type")
        if kind == "message" and isinstance(item.get("content"), list):
            parts = []
            for i, part in enumerate(item["content"]):
                part = dict(part) if isinstance(part, dict) else part
                if isinstance(part, dict):
                    if isinstance(part.get("text"), str):
                        part["text"] = from_channel("response.output_text", i, part["text"], f"{path}.content[{i}].text")
                    if isinstance(part.get("refusal"), str):
                        part["refusal"] = from_channel("response.refusal", i, part["refusal"], f"{path}.content[{i}].refusal")
                parts.append(part)
            masked["content"] = parts
        elif kind in ("function_call", "mcp_call") and isinstance(item.get("arguments"), str):
            masked["arguments"] = from_channel("response.function_call_arguments", 0, item["arguments"], f"{path}.arguments")
        elif kind == "custom_tool_call" and isinstance(item.get("input"), str):
            masked["input"] = from_channel("response.custom_tool_call_input", 0, item["input"], f"{path}.input")
        elif kind == "reasoning":
            for field, base in (("summary", "response.reasoning_summary_text"), ("content", "response.reasoning_text")):
                if isinstance(item.get(field), list):
                    masked[field] = [
                        dict(p, text=from_channel(base, i, p["text"], f"{path}.{field}[{i}].text"))
                        if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                        for i, p in enumerate(item[field])
                    ]
        else:
            masked = mask_output_item(item, path, self._mask_sync)
        if item_id is not None:
            self._masked_items[item_id] = masked
        return before, masked

    # ---- Chat Completions -------------------------------------------------------------------------
    def _chat_chunk(self, name: str | None, other: list[bytes], chunk: dict) -> bytes:
        self._chat_shape = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        before = b""
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for field in ("content", "refusal", "reasoning_content"):
                    if isinstance(delta.get(field), str):
                        path = f"choices[{index}].{field}"
                        delta[field] = self._channel(("chat", index, field), path).feed(delta[field])
                for call in delta.get("tool_calls") or []:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                        key = ("chat", index, "tool_calls", call.get("index", 0))
                        path = f"choices[{index}].tool_calls[{call.get('index', 0)}].function.arguments"
                        function["arguments"] = self._channel(key, path).feed(function["arguments"])
            if choice.get("finish_reason"):
                before += self._flush_all_chat(index, chunk, name, other)
        return before + self._serialize(name, other, chunk)

    def _flush_all_chat(self, only_choice: int | None, like: dict | None = None, name=None, other=()) -> bytes:
        """A chunk carrying every held tail of the choice(s), emitted before their finish or [DONE]."""
        deltas: dict[int, dict] = {}
        for key, channel in self._channels.items():
            if key[0] != "chat" or (only_choice is not None and key[1] != only_choice):
                continue
            tail = channel.finish()
            if not tail:
                continue
            delta = deltas.setdefault(key[1], {})
            if key[2] == "tool_calls":
                delta.setdefault("tool_calls", []).append({"index": key[3], "function": {"arguments": tail}})
            else:
                delta[key[2]] = tail
        if not deltas:
            return b""
        base = {k: v for k, v in (like or self._chat_shape).items() if k not in ("choices", "usage")}
        base["choices"] = [{"index": i, "delta": d, "finish_reason": None} for i, d in sorted(deltas.items())]
        return self._serialize(name, list(other), base)


class StreamNotDecodable(ValueError):
    """A streamed body in a content-encoding the gateway cannot decode incrementally."""


def stream_decoder(encoding: str) -> Callable[[bytes], bytes] | None:
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
    raise StreamNotDecodable(f"cannot decode a streamed body with content-encoding {encoding!r}")


def error_events(kind: str) -> list[bytes]:
    """The SSE event that ends a stream the gateway could not mask, in the shape the endpoint's clients raise on."""
    message = "the gateway could not mask this stream, so it was ended"
    # The openai SDK raises APIError for a streamed event whose data holds an "error" object;
    # Responses API clients also know the "error" event type.
    error = json.loads(error_body(502, "gateway_masking_failed", message))
    if kind == "chat":
        return [f"data: {json.dumps(error)}\n\n".encode()]
    event = {"type": "error", "code": "gateway_masking_failed", "message": message, "param": None, **error}
    return [f"event: error\ndata: {json.dumps(event)}\n\n".encode()]
