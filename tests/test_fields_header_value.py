"""header_value reads one header in a single pass over a mitmproxy Headers object's fields: it must
give exactly what ``Headers.get`` gives (folding, case, undecodable bytes, absent headers)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from auditgate.core.request_facts import header_value, is_event_stream

NAMES = [b"content-type", b"Content-Type", b"CONTENT-LENGTH", b"content-encoding", b"authorization", b"api-key",
         b"Proxy-Authorization", b"x-other", b"content-type2"]
VALUES = st.one_of(st.sampled_from([b"text/event-stream", b"Text/Event-Stream; charset=utf-8", b"application/json",
                                    b"", b"gzip", b"\xff\xfe", b"Bearer abc", b" 12 "]), st.binary(max_size=6))
fields = st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), st.binary(min_size=1, max_size=4)), VALUES), max_size=6)


@settings(max_examples=600, deadline=None)
@given(fields, st.sampled_from([n.lower() for n in NAMES]), st.sampled_from(["", None, "x"]))
def test_header_value_is_what_headers_get_gives(raw_fields, name, default) -> None:
    headers = http.Headers(raw_fields)
    assert header_value(headers, name, default) == headers.get(name.decode(), default)


@settings(max_examples=300, deadline=None)
@given(fields)
def test_is_event_stream_reads_the_content_type_as_before(raw_fields) -> None:
    response = http.Response.make(200, b"", http.Headers(raw_fields))
    content_type = response.headers.get("content-type", "")
    assert is_event_stream(response) == (content_type.split(";", 1)[0].strip().lower() == "text/event-stream")
