"""Masks streamed replies as they pass: text deltas with a bounded hold-back, OpenAI SSE events kept valid."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from auditgate.core.errors import error_body
from auditgate.masking.config import (
    DEFAULT_STREAM_EVENT_MAX_BYTES,
    DEFAULT_STREAM_MAX_BYTES,
)
from auditgate.masking.engine import Span
from auditgate.masking.payload import (
    SHADOW_KEYS,
    MaskFn,
    drop_shadow,
    mask_leaves,
    mask_output_item,
)

FindFn = Callable[[str], list[Span]]
ApplyFn = Callable[[str, list[Span]], str]

# The tail of unreleased text that could still grow into an entity: the current unbroken word (an
# email, key or address in progress) and, before it, groups that could belong to a spaced number,
# card or IBAN ("+1 415 555", "DE89 3704", "GB82 WEST 1234").
# Number groups separated by any space but a line end (no-break and thin spaces too: normalization
# reads them as spaces) and by the dashes, dots and full-width signs a spelling may use.
_GROWING_TAIL = re.compile(r"(?:(?:[^\W\d_]{2}\d{2}|[\dA-Z()+\-./\uff0b\uff0d\uff08\uff09\u2010-\u2015\u2212\u00b7\u2022]+)[^\S\r\n]+)*\S*\Z")


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
# The text fields of a Chat chunk's delta that stream (each through its own hold-back channel).
_CHAT_STREAMED = ("content", "refusal", "reasoning_content")
# The fields of an output item that arrive as deltas, by item type (the rest of the item is walked).
_STREAMED_FIELDS = {"message": ("content",), "function_call": ("arguments",), "mcp_call": ("arguments",),
                    "custom_tool_call": ("input",), "reasoning": ("summary", "content")}
# The field of a ".done" event that repeats its stream's whole text.
_DONE_FIELDS = ("text", "arguments", "refusal", "transcript", "input", "code")


class StreamNotMaskable(ValueError):
    """A stream the gateway will not mask any further: it ends with the SSE error event."""


class SseEventTooLarge(StreamNotMaskable):
    """One event (or one line of it) grew past the cap before its blank line came."""


class StreamTooLarge(StreamNotMaskable):
    """The stream, inflated, grew past the cap."""


@dataclass(slots=True)
class SseEvent:
    """One event as a WHATWG event-stream client dispatches it, plus the fields that came with it."""

    name: bytes | None  # the last `event:` field, if any
    data: bytes | None  # the `data:` lines joined with LF; None when there were none (nothing dispatched)
    ids: list[bytes]  # `id:` values (without NUL)
    retry: bytes | None  # the last all-digit `retry:` value
    comments: bool  # a comment line (": ...") came with it: a keep-alive


_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SseParser:
    """Splits an event stream into events exactly as an HTML5 (WHATWG) client does, with a size cap.

    CRLF, LF and a bare CR each end a line (a CR at the end of one chunk and an LF at the start of
    the next are one line end); a blank line ends an event; a line starting with ":" is a comment; a
    line without ":" is a field with an empty value; one space after the colon is dropped; unknown
    fields are ignored; a UTF-8 BOM before the first line is skipped. An event not ended by a blank
    line when the stream ends is not dispatched, as a client would not dispatch it.

    Every byte of a pending event counts towards max_event_bytes (the line in progress included):
    past it SseEventTooLarge is raised, so an event with no end cannot make the gateway hold an
    unbounded buffer.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_STREAM_EVENT_MAX_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._partial = bytearray()  # the line in progress
        self._after_cr = False  # the last chunk ended with CR: an LF starting the next one is its pair
        self._first_line = True
        self._reset()

    def _reset(self) -> None:
        self._name: bytes | None = None
        self._data: list[bytes] = []
        self._ids: list[bytes] = []
        self._retry: bytes | None = None
        self._comments = False
        self._size = 0  # bytes of the pending event's complete lines

    @property
    def pending_bytes(self) -> int:
        return self._size + len(self._partial)

    def feed(self, data: bytes) -> list[SseEvent]:
        if not data:
            return []
        if self._after_cr and data[:1] == b"\n":
            data = data[1:]
        self._after_cr = data[-1:] == b"\r"
        lines = _LINE_END.split(data) if b"\r" in data else data.split(b"\n")
        tail = lines.pop()  # after the last line end: the start of a line still to come
        if lines and self._partial:
            self._partial += lines[0]
            lines[0] = bytes(self._partial)
            self._partial.clear()
        events: list[SseEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        if tail:
            self._partial += tail
            if self._size + len(self._partial) > self.max_event_bytes:
                raise SseEventTooLarge(f"an event grew past {self.max_event_bytes} bytes without ending")
        return events

    def _line(self, line: bytes) -> SseEvent | None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            return self._dispatch()
        self._size += len(line) + 1
        if self._size > self.max_event_bytes:
            raise SseEventTooLarge(f"an event grew past {self.max_event_bytes} bytes without ending")
        if line[0] == 0x3A:  # ":"
            self._comments = True
            return None
        field, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._name = value
        elif field == b"id":
            if b"\0" not in value:
                self._ids.append(value)
        elif field == b"retry":
            if value.isdigit():
                self._retry = value
        # Any other field is ignored, as a client ignores it.
        return None

    def _dispatch(self) -> SseEvent | None:
        event = SseEvent(self._name, b"\n".join(self._data) if self._data else None, self._ids, self._retry,
                         self._comments)
        self._reset()
        if event.data is None and not (event.ids or event.retry or event.comments):
            return None  # an empty line, or only an event name: a client dispatches nothing
        return event


# Event names of the OpenAI APIs ("response.output_text.delta", "error"): dotted words, no digits, so
# they cannot carry an address, a number or a key. Any other name is masked like text.
_PLAIN_NAME = re.compile(r"[a-z_]{1,64}(?:\.[a-z_]{1,64}){0,8}")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def is_plain_event_name(name: str) -> bool:
    """An event name that cannot carry personal data or a key (dotted lowercase words): passed unmasked."""
    return _PLAIN_NAME.fullmatch(name) is not None

# Characters some SSE clients take for line ends (Python's str.splitlines does): inside a JSON string
# they are written escaped, so no client can cut a data line there.
_JSON_LINE_SEPARATORS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class SseStreamMasker:
    """Masks an OpenAI server-sent event stream (Responses API or Chat Completions) event by event.

    The output is built from what the parser understood, never copied from the input: a line the
    parser did not take as an event field cannot reach the client. Comments become bare ":" lines
    (still keep-alives), `id:` values are masked, `retry:` passes only as digits that masking left
    alone, unknown fields are dropped, event names other than plain dotted words are masked.
    """

    def __init__(self, new_text_masker: Callable[[str], TextStreamMasker], mask_sync: MaskFn,
                 max_event_bytes: int = DEFAULT_STREAM_EVENT_MAX_BYTES,
                 max_stream_bytes: int = DEFAULT_STREAM_MAX_BYTES) -> None:
        self._new_text_masker = new_text_masker
        self._mask_sync = mask_sync
        self._parser = SseParser(max_event_bytes)
        self.max_stream_bytes = max_stream_bytes
        self.received = 0  # bytes of the (decoded) stream fed so far
        self._names: dict[str, str] = {}  # event names already checked → what goes out
        self._channels: dict[tuple, TextStreamMasker] = {}
        self._templates: dict[tuple, dict] = {}
        self._masked_items: dict[str, Any] = {}
        self._next_seq: int | None = None
        self._chat_shape: dict = {"object": "chat.completion.chunk"}
        self.sync_findings: list[tuple[str, str]] = []

    # ---- framing ----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        self.received += len(data)
        if self.received > self.max_stream_bytes:
            raise StreamTooLarge(f"the stream grew past {self.max_stream_bytes} bytes")
        return b"".join([self._event(event) for event in self._parser.feed(data)])

    def finish(self) -> bytes:
        # An event the stream did not end with a blank line is dropped: a client would not dispatch it.
        return self._flush_all_responses() + self._flush_all_chat(None)

    @property
    def findings(self) -> list[tuple[str, str]]:
        found = list(self.sync_findings)
        for channel in self._channels.values():
            found += [(entity, channel.path) for entity in channel.findings]
        return found

    def _fields(self, event: SseEvent) -> list[bytes]:
        """The event's other fields as they may go out: nothing of them unexamined."""
        lines = [b":"] if event.comments else []
        for value in event.ids:
            masked = self._mask_sync(value.decode("utf-8", "replace"), "event.id")
            lines.append(b"id: " + masked.encode())
        if event.retry is not None:
            retry = event.retry.decode("ascii")
            if self._mask_sync(retry, "event.retry") == retry:
                lines.append(b"retry: " + event.retry)
        return lines

    def _event(self, event: SseEvent) -> bytes:
        other = self._fields(event)
        if event.data is None:
            return b"\n".join(other) + b"\n\n"
        name = event.name.decode("utf-8", "replace") if event.name is not None else None
        data = event.data.decode("utf-8", "replace")
        if data.strip() == "[DONE]":
            return self._flush_all_chat(None) + self._serialize(name, other, "[DONE]")
        try:
            payload = json.loads(data)
        except ValueError:
            # Not JSON: mask it as text, so nothing unknown passes unexamined.
            return self._serialize(name, other, self._mask_sync(data, "event"))
        if isinstance(payload, dict) and payload.get("object") in ("chat.completion.chunk", "text_completion"):
            return self._chat_chunk(name, other, payload)
        if isinstance(payload, dict) and isinstance(payload.get("type"), str):
            return b"".join(self._serialize(name and e.get("type", name), other, e) for e in self._responses_event(payload))
        return self._serialize(name, other, mask_leaves(payload, "event", self._mask_sync))

    def _name(self, name: str) -> str:
        known = self._names.get(name)
        if known is None:
            known = name if _PLAIN_NAME.fullmatch(name) else _LINE_BREAK.sub(" ", self._mask_sync(name, "event.name"))
            if len(self._names) < 256:
                self._names[name] = known
        return known

    def _serialize(self, name: str | None, other: list[bytes], payload: Any) -> bytes:
        lines = list(other)
        if name:
            lines.append(f"event: {self._name(name)}".encode())
        if isinstance(payload, str):
            text = payload
        else:
            text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
            if not text.isascii():
                text = text.translate(_JSON_LINE_SEPARATORS)
        lines += [b"data: " + line.encode() for line in _LINE_BREAK.split(text)]
        return b"\n".join(lines) + b"\n\n"

    def _channel(self, key: tuple, path: str) -> TextStreamMasker:
        if key not in self._channels:
            self._channels[key] = self._new_text_masker(path)
        return self._channels[key]

    # ---- Responses API ----------------------------------------------------------------------------
    def mask_event(self, event: dict) -> list[dict]:
        """One Responses-shaped event (a dict with a string "type"), masked: the events to send for it, in order.

        A delta carries what its channel released (maybe less than came); a ``.done`` (or an item or
        response repeating a streamed text) is preceded by a delta with the channel's held tail. The
        WebSocket side (``auditgate.websocket.masking``) uses this without the SSE framing.
        """
        return self._responses_event(event)

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
            raw = event["delta"]
            event = self._rest(event, "delta")
            self._templates[key] = {k: v for k, v in event.items() if k not in ("delta", *SHADOW_KEYS)}
            event["delta"] = self._channel(key, self._path(event, base)).feed(raw)
            # Logprobs spell the delta as received: they go out only with that very text.
            self._shadow(event, event["delta"] != raw)
            return [self._number(event)]
        if kind.endswith(".done") and kind not in ("response.content_part.done", "response.output_item.done",
                                                   "response.reasoning_summary_part.done"):
            base = kind[: -len(".done")]
            field = next((f for f in _DONE_FIELDS if isinstance(event.get(f), str)), None)
            if base in _NOT_TEXT:
                return [self._number(event)]
            if field is None:
                return [self._number(mask_leaves(event, "event", self._mask_sync))]
            raw = event[field]
            event = self._rest(event, field)
            before, event[field] = self._masked_channel_text(self._key(event, base), raw, self._path(event, base))
            self._shadow(event, event[field] != raw)
            return before + [self._number(event)]
        if kind in ("response.content_part.done", "response.reasoning_summary_part.done",
                    "response.content_part.added", "response.reasoning_summary_part.added"):
            part = event.get("part")
            before: list[dict] = []
            event = self._rest(event, "part")
            if isinstance(part, dict):
                field = next((f for f in _DONE_FIELDS if isinstance(part.get(f), str)), None)
                raw = part.get(field) if field else None
                masked_part = self._rest(part, field) if field else mask_leaves(part, "part", self._mask_sync)
                if field and kind.endswith(".done"):
                    base = {"refusal": "response.refusal", "reasoning_text": "response.reasoning_text",
                            "summary_text": "response.reasoning_summary_text"}.get(part.get("type"),
                                                                                  "response.output_text")
                    before, masked_part[field] = self._masked_channel_text(self._key(event, base), raw,
                                                                           self._path(event, base))
                elif field:
                    masked_part[field] = self._mask_sync(raw, self._path(event, "part")) if raw else raw
                if field:
                    self._shadow(masked_part, masked_part[field] != raw)
                event["part"] = masked_part
            elif part is not None:
                event["part"] = mask_leaves(part, "part", self._mask_sync)
            return before + [self._number(event)]
        if kind in ("response.output_item.done", "response.output_item.added"):
            item = event.get("item")
            event = self._rest(event, "item")
            before, event["item"] = self._mask_item(item, event.get("output_index", 0))
            return before + [self._number(event)]
        if kind in ("response.completed", "response.incomplete", "response.failed",
                    "response.created", "response.in_progress", "response.queued"):
            response = event.get("response")
            before = []
            event = self._rest(event, "response")
            event["response"] = response
            if isinstance(response, dict):
                # Everything else the response echoes (instructions, tools, metadata, errors) is text too.
                event["response"] = response = dict(self._rest(response, "output"), output=response.get("output"))
            else:
                event["response"] = mask_leaves(response, "event.response", self._mask_sync)
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
            elif isinstance(response, dict) and response.get("output") is not None:
                event["response"]["output"] = mask_leaves(response["output"], "output", self._mask_sync)
            return before + [self._number(event)]
        # An event type we do not know: every string leaf is masked; nothing passes unexamined.
        return [self._number(mask_leaves(event, "event", self._mask_sync))]

    def _mask_part(self, kind: str, field: str, i: int, part: Any, path: str, from_channel) -> Any:
        """One content or summary part of an item: its text from its channel, the rest walked."""
        if not isinstance(part, dict):
            return mask_leaves(part, f"{path}.{field}[{i}]", self._mask_sync)
        masked = self._rest(part, "text", "refusal")
        changed = False
        for name in ("text", "refusal"):
            if isinstance(part.get(name), str):
                base = ("response.refusal" if name == "refusal" else "response.output_text" if kind == "message"
                        else "response.reasoning_summary_text" if field == "summary" else "response.reasoning_text")
                masked[name] = from_channel(base, i, part[name], f"{path}.{field}[{i}].{name}")
                changed |= masked[name] != part[name]
            elif name in part:
                masked[name] = mask_leaves(part[name], f"{path}.{field}[{i}].{name}", self._mask_sync)
        self._shadow(masked, changed)
        return masked

    def _rest(self, obj: dict, *taken: str | None) -> dict:
        """A copy of obj with every field but `taken` (filled in by the caller) and its shadows masked."""
        rest = {k: v for k, v in obj.items() if k not in taken and k not in SHADOW_KEYS}
        masked = mask_leaves(rest, "event", self._mask_sync)
        for key in SHADOW_KEYS:
            if key in obj:
                masked[key] = obj[key]
        return masked

    @staticmethod
    def _shadow(obj: dict, text_changed: bool) -> None:
        """Logprobs stay only beside text that goes out as it came (see payload's module docstring)."""
        if text_changed:
            for key in SHADOW_KEYS:
                if key in obj:
                    obj[key] = drop_shadow(obj[key])

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

        kind = item.get("type")
        streamed = _STREAMED_FIELDS.get(kind)
        if streamed is None:
            # Unknown item types (search results, computer actions, ...): every text leaf, nothing passes.
            masked = mask_output_item(item, path, self._mask_sync)
        else:
            masked = self._rest(item, *streamed)
            for field in streamed:
                value = item.get(field)
                if field in ("content", "summary") and isinstance(value, list):
                    masked[field] = [self._mask_part(kind, field, i, part, path, from_channel)
                                     for i, part in enumerate(value)]
                elif field in ("arguments", "input") and isinstance(value, str):
                    base = ("response.custom_tool_call_input" if field == "input"
                            else "response.mcp_call_arguments" if kind == "mcp_call" and (
                                ("response.mcp_call_arguments", item_id, 0) in self._channels)
                            else "response.function_call_arguments")
                    masked[field] = from_channel(base, 0, value, f"{path}.{field}")
                elif field in item:
                    masked[field] = mask_leaves(value, f"{path}.{field}", self._mask_sync)
        if item_id is not None:
            self._masked_items[item_id] = masked
        return before, masked

    # ---- Chat Completions -------------------------------------------------------------------------
    def _chat_chunk(self, name: str | None, other: list[bytes], chunk: dict) -> bytes:
        choices = chunk.get("choices")
        chunk = self._rest(chunk, "choices")  # id, model, usage... and any unknown field: walked
        self._chat_shape = {k: v for k, v in chunk.items() if k not in ("choices", "usage", *SHADOW_KEYS)}
        before = b""
        if not isinstance(choices, list):
            if choices is not None:
                chunk["choices"] = mask_leaves(choices, "choices", self._mask_sync)
            return self._serialize(name, other, chunk)
        masked_choices = []
        for choice in choices:
            if not isinstance(choice, dict):
                masked_choices.append(mask_leaves(choice, "choices", self._mask_sync))
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            masked = self._rest(choice, "delta", "text")
            changed = False
            if isinstance(choice.get("text"), str):  # a completions-style chunk: its text streams too
                masked["text"] = self._channel(("chat", index, "text"), f"choices[{index}].text").feed(choice["text"])
                changed |= masked["text"] != choice["text"]
            if isinstance(delta, dict):
                fields = [f for f in _CHAT_STREAMED if isinstance(delta.get(f), str)]
                calls = delta.get("tool_calls")
                masked_delta = self._rest(delta, *fields, "tool_calls")
                for field in fields:
                    path = f"choices[{index}].{field}"
                    masked_delta[field] = self._channel(("chat", index, field), path).feed(delta[field])
                    changed |= masked_delta[field] != delta[field]
                if isinstance(calls, list):
                    masked_calls = []
                    for call in calls:
                        function = call.get("function") if isinstance(call, dict) else None
                        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                            key = ("chat", index, "tool_calls", call.get("index", 0))
                            path = f"choices[{index}].tool_calls[{call.get('index', 0)}].function.arguments"
                            masked_function = self._rest(function, "arguments")
                            masked_function["arguments"] = self._channel(key, path).feed(function["arguments"])
                            changed |= masked_function["arguments"] != function["arguments"]
                            masked_calls.append(dict(self._rest(call, "function"), function=masked_function))
                        else:
                            masked_calls.append(mask_leaves(call, "tool_calls", self._mask_sync))
                    masked_delta["tool_calls"] = masked_calls
                elif calls is not None:
                    masked_delta["tool_calls"] = mask_leaves(calls, "tool_calls", self._mask_sync)
                masked["delta"] = masked_delta
            elif delta is not None:
                masked["delta"] = mask_leaves(delta, "delta", self._mask_sync)
            # Logprobs spell the chunk's text as received: they go out only with that very text.
            self._shadow(masked, changed)
            masked_choices.append(masked)
            if choice.get("finish_reason"):
                before += self._flush_all_chat(index, chunk, name, other)
        chunk["choices"] = masked_choices
        return before + self._serialize(name, other, chunk)

    def _flush_all_chat(self, only_choice: int | None, like: dict | None = None, name=None, other=()) -> bytes:
        """A chunk carrying every held tail of the choice(s), emitted before their finish or [DONE]."""
        deltas: dict[int, dict] = {}
        texts: dict[int, str] = {}
        for key, channel in self._channels.items():
            if key[0] != "chat" or (only_choice is not None and key[1] != only_choice):
                continue
            tail = channel.finish()
            if not tail:
                continue
            if key[2] == "text":
                texts[key[1]] = tail
                continue
            delta = deltas.setdefault(key[1], {})
            if key[2] == "tool_calls":
                delta.setdefault("tool_calls", []).append({"index": key[3], "function": {"arguments": tail}})
            else:
                delta[key[2]] = tail
        if not deltas and not texts:
            return b""
        base = {k: v for k, v in (like or self._chat_shape).items() if k not in ("choices", "usage")}
        base["choices"] = [
            {"index": i, **({"text": texts[i]} if i in texts else {}), **({"delta": deltas[i]} if i in deltas else {}),
             "finish_reason": None}
            for i in sorted(set(deltas) | set(texts))]
        return self._serialize(name, list(other), base)


class StreamNotDecodable(StreamNotMaskable):
    """A streamed body in a content-encoding the gateway cannot decode incrementally."""


# Inflated output is handed on in pieces of at most this size, each masked before the next is made:
# a few compressed bytes that inflate to gigabytes are stopped at the stream's cap, not held whole.
INFLATE_PIECE = 64 * 1024

Decoder = Callable[[bytes], Iterator[bytes]]


def _zlib_decoder() -> Decoder:
    wbits = zlib.MAX_WBITS | 32  # 32: a gzip or a zlib header
    state = {"d": zlib.decompressobj(wbits)}

    def decode(data: bytes) -> Iterator[bytes]:
        d = state["d"]
        if not data:
            tail = d.flush()
            if tail:
                yield tail
            return
        while data:
            out = d.decompress(data, INFLATE_PIECE)
            if out:
                yield out
            if d.eof:  # one gzip member ended: another may follow (RFC 1952 allows several)
                data = d.unused_data
                d = state["d"] = zlib.decompressobj(wbits)
                continue
            data = d.unconsumed_tail
            while not data and len(out) == INFLATE_PIECE:  # all input taken, output may still be waiting
                out = d.decompress(b"", INFLATE_PIECE)
                if out:
                    yield out
    return decode


def _brotli_decoder() -> Decoder:
    import brotli

    b = brotli.Decompressor()

    def decode(data: bytes) -> Iterator[bytes]:
        if not data:
            return
        # The limit stops the output buffer growing once it is reached (a piece can be a little
        # larger); what is still to come is fetched with empty input until there is none.
        out = b.process(data, output_buffer_limit=INFLATE_PIECE)
        while out:
            yield out
            out = b.process(b"", output_buffer_limit=INFLATE_PIECE)
    return decode


def _zstd_decoder() -> Decoder:
    try:
        from compression import zstd  # Python 3.14
    except ImportError:
        from backports import zstd  # what mitmproxy itself uses before 3.14

    state = {"d": zstd.ZstdDecompressor()}

    def decode(data: bytes) -> Iterator[bytes]:
        if not data:
            return
        d = state["d"]
        while True:
            out = d.decompress(data, INFLATE_PIECE)
            if out:
                yield out
            if d.eof:  # one frame ended: another may follow
                data = d.unused_data
                if not data:
                    state["d"] = zstd.ZstdDecompressor()
                    return
                d = state["d"] = zstd.ZstdDecompressor()
                continue
            if d.needs_input:
                return
            data = b""
    return decode


def stream_decoder(encoding: str) -> Decoder | None:
    """An incremental decoder for a streamed body's content-encoding (stream callables see it encoded).

    The decoder takes each chunk as it arrives (b"" at the end) and yields its inflated bytes in
    pieces of at most INFLATE_PIECE (brotli's: at most about 1.5 times that), lazily: a piece is made
    only when the one before it has been taken. None for a body that is not encoded.
    """
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _zlib_decoder()
    if encoding == "br":
        return _brotli_decoder()
    if encoding == "zstd":
        return _zstd_decoder()
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
