"""Finding the gateway's own upstream keys echoed back in a reply, and blotting them out.

An upstream may hand the key it was sent straight back: in an error message, a request-id header,
a redirect target (``Location: ...?k=KEY``), or a streamed reply, where a model repeating it spreads
it over several text deltas. Whatever shape the key has (``sk-...``, an Azure key of bare hex), the
reply the caller gets and the record the gateway writes carry a marker in its place.

Every replacement keeps the byte length of what it replaces, so a reply's framing (its
Content-Length, an event's size) stays right wherever the scrub happens. Nothing here imports
mitmproxy: the bytes, texts and streams are plain values.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable
from urllib.parse import quote

MARKER = "[upstream-key-removed]"
ENTITY = "UPSTREAM_KEY"  # the entity type a stream scrub reports
_PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def preload() -> None:
    """Import the SSE walker now (it brings Presidio along), not inside the event loop at the first stream."""
    importlib.import_module("auditgate.masking.stream")


def marker(length: int) -> str:
    """What replaces a key of ``length`` characters: the marker cut or padded to that length."""
    if length < len(MARKER):
        return "*" * length
    return MARKER + "*" * (length - len(MARKER))


def _spellings(key: str) -> set[str]:
    """How a key may be written in a reply: as is, percent-encoded (a URL), JSON-escaped (a body)."""
    spellings = {key, quote(key, safe=""), json.dumps(key)[1:-1], json.dumps(key, ensure_ascii=False)[1:-1],
                 key.replace("/", "\\/")}
    # Hex digits in either case are the same URL.
    spellings.add(_PERCENT_ESCAPE.sub(lambda m: m.group().lower(), quote(key, safe="")))
    return spellings


class KeyEchoes:
    """The keys to look for in replies, each in every spelling a reply may use."""

    def __init__(self, keys: Iterable[str]) -> None:
        texts = sorted({s for key in keys if key for s in _spellings(key)}, key=len, reverse=True)
        self.texts: tuple[str, ...] = tuple(texts)  # longest first: a spelling inside another is found in it
        self.raw: tuple[bytes, ...] = tuple(dict.fromkeys(t.encode() for t in texts))
        self._raw_markers = {b: marker(len(b)).encode() for b in self.raw}
        self.longest = max((len(b) for b in self.raw), default=0)
        self._firsts = frozenset(b[:1] for b in self.raw)

    def __bool__(self) -> bool:
        return bool(self.raw)

    # ---- bytes -----------------------------------------------------------------------------------
    def occurs_in(self, data: bytes) -> bool:
        """Whether any spelling of any key is in ``data`` (what scrub would find at least once)."""
        for raw in self.raw:
            if raw in data:
                return True
        return False

    def scrub(self, data: bytes) -> tuple[bytes, int]:
        """``data`` with every spelling of every key replaced, and how many were."""
        found = 0
        for raw in self.raw:
            if raw in data:
                found += data.count(raw)
                data = data.replace(raw, self._raw_markers[raw])
        return data, found

    def partial_tail(self, data: bytes) -> int:
        """The length of the longest end of ``data`` that begins a spelling (a key that may go on in the next chunk)."""
        n = len(data)
        start = max(0, n - self.longest + 1)
        best = 0
        for first in self._firsts:
            i = data.find(first, start)
            while i >= 0 and n - i > best:
                rest = data[i:]
                if any(raw.startswith(rest) for raw in self.raw):
                    best = n - i
                    break
                i = data.find(first, i + 1)
        return best

    # ---- text ------------------------------------------------------------------------------------
    def scrub_text(self, text: str) -> tuple[str, int]:
        found = 0
        for spelling in self.texts:
            if spelling in text:
                found += text.count(spelling)
                text = text.replace(spelling, marker(len(spelling)))
        return text, found

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where a key stands in ``text``, as (start, end) pairs, overlapping ones merged."""
        spans: list[tuple[int, int]] = []
        for spelling in self.texts:
            start = text.find(spelling)
            while start >= 0:
                spans.append((start, start + len(spelling)))
                start = text.find(spelling, start + 1)
        spans.sort()
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged


def scrub_json(echoes: KeyEchoes, data: bytes) -> tuple[bytes, int]:
    """A JSON document with the keys taken out of every string in it, object keys too, as its reader sees
    them: a key spelled with JSON escapes (``\\u0073k-...``) is found once they are decoded. Every member
    of an object counts, a duplicate name's earlier values too. Unchanged (and 0) when ``data`` is not JSON or
    holds no key; otherwise written again (a duplicate name keeps its last value, as readers take it)."""
    try:
        document = json.loads(data, object_pairs_hook=_Members)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return data, 0
    found = [0]

    def walk(value):
        if isinstance(value, str):
            text, n = echoes.scrub_text(value)
            found[0] += n
            return text
        if isinstance(value, _Members):
            return {walk(name): walk(member) for name, member in value}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    scrubbed = walk(document)
    if not found[0]:
        return data, 0
    text = json.dumps(scrubbed, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode(), found[0]
    except UnicodeEncodeError:  # a lone surrogate, valid only escaped
        return json.dumps(scrubbed, separators=(",", ":")).encode(), found[0]


class _Members(list):
    """An object's members as read, in order, duplicates kept."""


class ByteStreamScrubber:
    """Scrubs a body that passes in chunks: a key split over two chunks is still found.

    Only what could be the start of a key is held back (at most the longest spelling less one byte),
    so an event stream's events still leave as they arrive.
    """

    def __init__(self, echoes: KeyEchoes) -> None:
        self.echoes = echoes
        self._held = b""
        self.found = 0

    def feed(self, data: bytes) -> bytes:
        data = self._held + data
        data, found = self.echoes.scrub(data)
        self.found += found
        keep = self.echoes.partial_tail(data)
        self._held = data[len(data) - keep:] if keep else b""
        return data[: len(data) - keep] if keep else data

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return held  # no key is complete in it (it would have been found)


def chunks_of(result: bytes | list[bytes] | None) -> list[bytes]:
    """What a mitmproxy stream callable returned, as a list of chunks."""
    if result is None:
        return []
    if isinstance(result, (bytes, bytearray)):
        return [bytes(result)] if result else []
    return [bytes(c) for c in result if c]


def as_stream_result(chunks: list[bytes]) -> list[bytes]:
    """Chunks for mitmproxy: never b"" (which would end the body mid-stream), [] when there is nothing."""
    joined = b"".join(chunks)
    return [joined] if joined else []


def text_scrubbers(echoes: KeyEchoes):
    """A maker of one streaming scrubber per text field (its path) of a streamed reply: the masking layer's
    TextStreamMasker with the upstream key as its only entity, so a key spread over several deltas is found
    and each delta still leaves at once, but for a tail that may begin a key."""
    from auditgate.masking.engine import Span
    from auditgate.masking.stream import TextStreamMasker

    def find(text: str) -> list[Span]:
        return [Span(ENTITY, start, end, 1.0) for start, end in echoes.spans(text)]

    def apply(text: str, spans: list[Span]) -> str:
        out, at = [], 0
        for span in sorted(spans, key=lambda s: s.start):
            if span.start < at:
                continue
            out += [text[at:span.start], marker(span.end - span.start)]
            at = span.end
        return "".join(out) + text[at:]

    def text_scrubber(path: str) -> TextStreamMasker:
        return TextStreamMasker(find, apply, max(echoes.longest - 1, 1), path)

    return text_scrubber


class ReplyStreamScrubber:
    """Everything a streamed reply carries, with the keys taken out, whatever way the stream splits them.

    An event stream (``text/event-stream``) is read event by event, and each text that arrives in
    deltas (a Responses ``*.delta`` field, a Chat ``delta.content``...) is followed across its deltas, so
    a key the model spells out over several of them is caught: the masking addon's SSE walker does
    this, here with the keys as the only thing to find. After it, and for any other stream, the bytes
    are scrubbed with a hold-back across chunks. A stream in a content-encoding is inflated first
    (its Content-Encoding must then be dropped: the caller gets it plain).
    """

    def __init__(self, echoes: KeyEchoes, *, event_stream: bool, codings: list[str] | None = None,
                 max_event_bytes: int = 16 * 1024 * 1024, max_inflated_bytes: int = 1 << 34) -> None:
        self.echoes = echoes
        self.bytes = ByteStreamScrubber(echoes)
        self._text_found = 0
        self._inflater = None
        if codings:
            from auditgate.transport.inflate import Inflater

            self._inflater = Inflater(codings, max_inflated_bytes)
        self._sse = self._sse_walker(max_event_bytes) if event_stream else None

    def _sse_walker(self, max_event_bytes: int):
        from auditgate.masking.stream import SseStreamMasker

        echoes = self.echoes

        def scrub_sync(text: str, path: str) -> str:
            text, found = echoes.scrub_text(text)
            self._text_found += found
            return text

        return SseStreamMasker(text_scrubbers(echoes), scrub_sync, max_event_bytes, 1 << 62)

    @property
    def found(self) -> int:
        """How many echoes of a key were taken out so far."""
        across_deltas = len(self._sse.findings) if self._sse is not None else 0
        return self._text_found + across_deltas + self.bytes.found

    def feed(self, data: bytes) -> bytes:
        if self._inflater is not None:
            data = self._inflater.feed(data)
        if self._sse is None:
            return self.bytes.feed(data)
        # The walker hands out whole events: a key cannot run on from one into the next, so the bytes
        # are scrubbed as they are, with nothing held back.
        return self._scrub(self._sse.feed(data))

    def finish(self) -> bytes:
        out = self._inflater.finish() if self._inflater is not None else b""
        if self._sse is None:
            return self.bytes.feed(out) + self.bytes.finish()
        return self._scrub((self._sse.feed(out) if out else b"") + self._sse.finish())

    def _scrub(self, data: bytes) -> bytes:
        data, found = self.echoes.scrub(data)
        self.bytes.found += found
        return data
