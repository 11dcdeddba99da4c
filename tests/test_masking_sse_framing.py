"""SSE framing as a WHATWG client frames it (CR, LF, CRLF, split anywhere), its caps, and bounded inflation."""

from __future__ import annotations

import gzip
import json
import random
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from auditgate.masking.config import load_masking_settings
from auditgate.masking.engine import PiiMasker
from auditgate.masking.stream import (
    INFLATE_PIECE,
    SseEvent,
    SseEventTooLarge,
    SseParser,
    SseStreamMasker,
    StreamNotDecodable,
    StreamTooLarge,
    TextStreamMasker,
    stream_decoder,
)
from tests.fake_openai import FakeOpenAI
from tests.masking_fixtures import (
    MASKED_SENTENCE,
    PII_SENTENCE,
    PII_VALUES,
    shipped_rules,
)

try:
    from compression import zstd
except ImportError:
    from backports import zstd

RAW = [v.encode() for v in PII_VALUES.values()]


# ---- a reference: the WHATWG interpretation, written out character by character ----------------------
def reference_events(stream: bytes) -> list[SseEvent]:
    """What an HTML5 client dispatches for a whole stream (the spec's steps, one byte at a time)."""
    stream = stream.removeprefix(b"\xef\xbb\xbf")
    lines, line, i = [], bytearray(), 0
    while i < len(stream):
        byte = stream[i]
        if byte in (10, 13):
            lines.append(bytes(line))
            line = bytearray()
            if byte == 13 and stream[i + 1:i + 2] == b"\n":
                i += 1
        else:
            line.append(byte)
        i += 1
    # A last line with no line end is never processed; an event with no blank line is never dispatched.
    events, name, data, ids, retry, comments = [], None, [], [], None, False
    for line in lines:
        if line == b"":
            event = SseEvent(name, b"\n".join(data) if data else None, ids, retry, comments)
            if event.data is not None or ids or retry is not None or comments:
                events.append(event)
            name, data, ids, retry, comments = None, [], [], None, False
        elif line.startswith(b":"):
            comments = True
        else:
            if b":" in line:
                field, value = line.split(b":", 1)
                value = value[1:] if value.startswith(b" ") else value
            else:
                field, value = line, b""
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value
            elif field == b"id" and b"\0" not in value:
                ids.append(value)
            elif field == b"retry" and value and all(48 <= b <= 57 for b in value):
                retry = value
    return events


def parse_in_chunks(stream: bytes, cuts: list[int], max_event_bytes: int = 1 << 20) -> list[SseEvent]:
    parser = SseParser(max_event_bytes)
    events, at = [], 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        events += parser.feed(stream[at:cut])
        at = cut
    return events


_TOKENS = [b"data", b"event", b"id", b"retry", b":", b" ", b"\r", b"\n", b"\r\n", b"x", b"7", b"\xef\xbb\xbf",
           b"\0", b"\xc3\xa9", b"{}", b"response.created", b"unknown"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=60), st.lists(st.integers(0, 400), max_size=8))
def test_any_stream_split_anywhere_frames_as_a_whatwg_client_does(tokens, cuts):
    stream = b"".join(tokens)
    assert parse_in_chunks(stream, [c for c in cuts if c <= len(stream)]) == reference_events(stream)


_EVENT = st.fixed_dictionaries({
    "name": st.none() | st.sampled_from(["response.output_text.delta", "message", "x"]),
    "data": st.lists(st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=20), min_size=1,
                     max_size=3),
    "id": st.none() | st.text("abc123", max_size=5),
    "comment": st.booleans(),
})


@settings(max_examples=150, deadline=None)
@given(st.lists(_EVENT, min_size=1, max_size=6), st.data())
def test_events_with_any_line_ends_come_out_as_the_same_events(events, data):
    """LF, CRLF, bare CR, or a mix line by line: the same events; and the openai SDK agrees."""
    lines: list[bytes] = []
    for event in events:
        if event["comment"]:
            lines.append(b": keep-alive")
        if event["id"] is not None:
            lines.append(b"id: " + event["id"].encode())
        if event["name"]:
            lines.append(b"event: " + event["name"].encode())
        lines += [b"data: " + d.encode() for d in event["data"]]
        lines.append(b"")
    ends = data.draw(st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=len(lines), max_size=len(lines)))
    for i in range(1, len(lines)):
        if ends[i - 1] == b"\r" and lines[i] == b"" and ends[i] == b"\n":
            ends[i] = b"\r\n"  # CR then LF would be one line end (CRLF), not a line and a blank line
    stream = b"".join(line + end for line, end in zip(lines, ends))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    parsed = parse_in_chunks(stream, cuts)
    assert [(e.name and e.name.decode(), e.data.decode()) for e in parsed] == [
        (event["name"], "\n".join(event["data"])) for event in events]
    sdk = list(SSEDecoder().iter_bytes(iter([stream])))
    assert [(s.event, s.data) for s in sdk] == [(e.name and e.name.decode(), e.data.decode()) for e in parsed]


MIXED = (b"\xef\xbb\xbf: hello\r\nevent: response.created\rdata: {\"a\":\r\ndata: 1}\n\r"
         b"id: 42\r\nretry: 1500\n\n"
         b"data: two\r\rdata:three\r\nevent\n\ndata\r\r"
         b"event: only-a-name\r\r")


def test_every_byte_boundary_and_byte_by_byte():
    whole = reference_events(MIXED)
    assert [e.data for e in whole] == [b'{"a":\n1}', None, b"two", b"three", b""]
    for cut in range(len(MIXED) + 1):
        assert parse_in_chunks(MIXED, [cut]) == whole, cut
    assert parse_in_chunks(MIXED, list(range(len(MIXED)))) == whole


def test_an_unfinished_last_event_is_not_dispatched():
    parser = SseParser()
    assert parser.feed(b"data: one\n\ndata: two") == [SseEvent(None, b"one", [], None, False)]
    assert parser.feed(b"\n") == []  # no blank line: not an event yet (and at the end of the stream, never)


# ---- the cap on a pending event ----------------------------------------------------------------------
def test_an_event_past_the_cap_is_refused_whether_its_line_ends_or_not():
    with pytest.raises(SseEventTooLarge):
        SseParser(1024).feed(b"data: " + b"x" * 2000)  # one line, never ended
    parser = SseParser(1024)
    with pytest.raises(SseEventTooLarge):
        for _ in range(100):
            parser.feed(b"data: " + b"x" * 100 + b"\r")  # many lines, no blank line
    # Many events, each within the cap: no limit on the stream as such.
    parser = SseParser(1024)
    for _ in range(100):
        assert len(parser.feed(b"data: " + b"x" * 900 + b"\r\r")) == 1


def test_a_line_arriving_slowly_is_still_capped():
    parser = SseParser(4096)
    with pytest.raises(SseEventTooLarge):
        for _ in range(1000):
            parser.feed(b"y" * 10)
    assert parser.pending_bytes <= 4096 + 10


# ---- masking through the framing ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masker() -> PiiMasker:
    return PiiMasker(load_masking_settings(shipped_rules()))


def _sse_masker(masker, **caps) -> SseStreamMasker:
    entities = masker.entities("response")

    def text_masker(path):
        return TextStreamMasker(lambda t: masker.find(t, entities), masker.apply, 64, path)

    return SseStreamMasker(text_masker, lambda text, path: masker.mask(text, "response")[0], **caps)


def _stream(events, end: bytes = b"\n") -> bytes:
    out = b""
    for name, payload in events:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        out += (f"event: {name}{end.decode()}" if name else "").encode() + f"data: {data}".encode() + end + end
    return out


def _masked(masker, stream: bytes, cuts=()) -> bytes:
    sse = _sse_masker(masker)
    out, at = b"", 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        out += sse.feed(stream[at:cut])
        at = cut
    return out + sse.finish()


@pytest.mark.parametrize("end", [b"\r", b"\r\n", b"\n"])
def test_a_stream_framed_with_any_line_end_is_masked_the_same(masker, end):
    fake = FakeOpenAI(reply_text=PII_SENTENCE, deltas=23)
    events = list(fake.responses_events({"model": "m", "stream": True}))
    expected = _masked(masker, _stream(events))
    stream = _stream(events, end)
    assert _masked(masker, stream) == expected
    assert _masked(masker, stream, random.Random(1).sample(range(len(stream)), 40)) == expected
    assert not [v for v in RAW if v in expected]
    deltas = [json.loads(s.data)["delta"] for s in SSEDecoder().iter_bytes(iter([expected]))
              if s.event == "response.output_text.delta"]
    assert "".join(deltas) == MASKED_SENTENCE


def test_masked_output_is_the_same_for_every_split_point(masker):
    fake = FakeOpenAI(reply_text=PII_SENTENCE, deltas=5)
    chunks = list(fake.chat_chunks({"model": "m", "stream": True}))
    stream = _stream([*((None, c) for c in chunks), (None, "[DONE]")], b"\r")
    expected = _masked(masker, stream)
    assert not [v for v in RAW if v in expected]
    for cut in range(0, len(stream) + 1, 7):
        assert _masked(masker, stream, [cut]) == expected, cut


def test_comments_ids_retry_names_and_unknown_fields_never_carry_raw_text(masker):
    email, card = PII_VALUES["EMAIL_ADDRESS"], PII_VALUES["CREDIT_CARD"].replace(" ", "")
    stream = (f": {email}\rid: {email}\rretry: {card}\rx-note: {email}\r{email}\revent: {email}\r"
              f"data: plain text to {email}\r\r"
              f": {email}\rid: {email}\r\r"  # no data: the fields alone (a keep-alive)
              f"event: {email}\r\r").encode()  # a name alone: nothing
    out = _masked(masker, stream)
    assert not [v for v in RAW if v in out], out
    assert not [v for v in (email.encode(), card.encode()) if v in out], out
    assert b"x-note" not in out
    sdk = list(SSEDecoder().iter_bytes(iter([out])))
    assert [(s.event, s.data, s.id) for s in sdk][0] == ("<EMAIL_ADDRESS>", "plain text to <EMAIL_ADDRESS>",
                                                         "<EMAIL_ADDRESS>")
    assert out.startswith(b":\n")  # a comment stays a keep-alive, with nothing in it


def test_known_safe_fields_pass(masker):
    out = _masked(masker, b": ping\nid: evt_17\nretry: 3000\nevent: response.created\ndata: {\"type\": \"x.y\"}\n\n")
    assert out == b':\nid: evt_17\nretry: 3000\nevent: x.y\ndata: {"type":"x.y"}\n\n'


def test_a_json_string_keeps_line_separators_escaped(masker):
    # Clients that split lines with str.splitlines also split at U+2028: a structural value (left
    # unmasked) holding one must not become a line of its own for them.
    out = _masked(masker, _stream([(None, {"type": "x", "id": "a\u2028data: b"})]))
    assert "\u2028".encode() not in out and b"\\u2028" in out


def test_the_stream_cap_counts_every_byte(masker):
    sse = _sse_masker(masker, max_event_bytes=2048, max_stream_bytes=100_000)
    event = b"data: " + json.dumps({"type": "x", "n": "y" * 900}).encode() + b"\n\n"
    with pytest.raises(StreamTooLarge):
        for _ in range(200):
            sse.feed(event)
    assert sse.received <= 100_000 + len(event)


# ---- inflating, bounded ----------------------------------------------------------------------------------
def _gzip_members(*parts: bytes) -> bytes:
    return b"".join(gzip.compress(p) for p in parts)


def _encode(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return _gzip_members(data[: len(data) // 2], data[len(data) // 2:])  # two members, as RFC 1952 allows
    if encoding == "deflate":
        return zlib.compress(data)
    if encoding == "br":
        return brotli.compress(data, quality=5)
    half = len(data) // 2
    return zstd.compress(data[:half]) + zstd.compress(data[half:])  # two frames


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_each_encoding_decodes_incrementally_in_bounded_pieces(encoding):
    plain = b"".join(b"data: %d %s\n\n" % (i, b"z" * (i % 300)) for i in range(3000))
    encoded = _encode(encoding, plain)
    rng = random.Random(encoding)
    decode = stream_decoder(encoding)
    out, at = [], 0
    while at < len(encoded):
        step = rng.randint(1, 5000)
        out += list(decode(encoded[at:at + step]))
        at += step
    out += list(decode(b""))
    assert b"".join(out) == plain
    assert max(len(piece) for piece in out) <= 2 * INFLATE_PIECE  # brotli's limit is a little soft


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_bomb_is_inflated_only_as_far_as_it_is_read(encoding):
    bomb = _encode(encoding, b"a" * (32 << 20))  # 32 MB inflated, a few dozen KB on the wire
    assert len(bomb) < 1 << 20
    pieces = stream_decoder(encoding)(bomb)
    first = next(pieces)
    assert 0 < len(first) <= 2 * INFLATE_PIECE  # the rest has not been made: a generator, one piece at a time
    pieces.close()


def test_a_bomb_through_the_masker_stops_at_the_cap(masker):
    # One endless line: stopped at the event cap.
    sse = _sse_masker(masker, max_event_bytes=1 << 20, max_stream_bytes=8 << 20)
    bomb = gzip.compress(b"data: " + b"a" * (32 << 20), compresslevel=1)
    inflated = 0
    with pytest.raises(SseEventTooLarge):
        for piece in stream_decoder("gzip")(bomb):
            inflated += len(piece)
            sse.feed(piece)
    assert inflated <= (1 << 20) + INFLATE_PIECE
    # Endless small events: stopped at the stream cap.
    event = b"data: " + json.dumps({"type": "x", "v": "b" * 1000}).encode() + b"\n\n"
    events = gzip.compress(event * 4000, compresslevel=1)
    sse, inflated = _sse_masker(masker, max_event_bytes=4096, max_stream_bytes=1 << 20), 0
    with pytest.raises(StreamTooLarge):
        for piece in stream_decoder("gzip")(events):
            inflated += len(piece)
            sse.feed(piece)
    assert inflated <= (1 << 20) + INFLATE_PIECE


def test_an_unknown_encoding_cannot_be_streamed():
    with pytest.raises(StreamNotDecodable):
        stream_decoder("x-unknown-coding")
    assert stream_decoder("identity") is None and stream_decoder("") is None
