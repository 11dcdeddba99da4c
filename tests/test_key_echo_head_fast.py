"""Scrubbing a reply's head checks the whole head for a key once before it rewrites field by field:
the outcome (fields, count) is exactly the field-by-field scrub's, found or not."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from auditgate.routing.key_echo import KeyEchoes
from auditgate.routing.key_on_wire import WireKeys

KEYS = ["sk-bench-upstream-key-0123456789abcdef", "0123abcd/ef+=45"]
ECHOES = KeyEchoes(KEYS)
PIECES = [b"sk-bench-", b"upstream-key-", b"0123456789abcdef", b"0123abcd", b"/ef+=45", b"%2F", b"\\/", b"x", b"\n", b""]
part = st.lists(st.one_of(st.sampled_from(PIECES + list(ECHOES.raw)), st.binary(max_size=4)), max_size=5).map(b"".join)


def field_by_field(fields):
    found, out = 0, []
    for name, value in fields:
        value, in_value = ECHOES.scrub(value)
        new_name, in_name = ECHOES.scrub(name)
        if in_name:
            new_name = b"x-upstream-key-removed"
        found += in_value + in_name
        out.append((new_name, value))
    return (tuple(out) if found else tuple(fields)), found


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(part.filter(bool), part), max_size=6))
def test_head_scrub_equals_the_field_by_field_scrub(fields) -> None:
    wire = WireKeys()
    wire.echoes = ECHOES
    headers = http.Headers(fields)
    found = wire.scrub_headers(headers)
    assert (tuple(headers.fields), found) == field_by_field(tuple(fields))
    assert ECHOES.occurs_in(b"\n".join(p for f in fields for p in f)) or found == 0
