"""The request written to the upstream (the key in place of the placeholder) is built by a shallow copy
of its own: it must be exactly what copy.copy() and a checked Headers() built, and leave the flow's
request untouched."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from auditgate.routing.key_on_wire import WireKeys, _shallow_copy

header_fields = st.lists(st.tuples(st.sampled_from([b"content-type", b"Authorization", b"user-agent", b"x-a", b"api-key"]),
                                   st.binary(max_size=8)), max_size=6)


def reference(wire: WireKeys, request: http.Request) -> http.Request:
    wired = copy.copy(request)
    wired.data = copy.copy(request.data)
    wired.data.headers = http.Headers(wire.on_wire_fields(request, list(request.headers.fields)))
    return wired


@settings(max_examples=300, deadline=None)
@given(header_fields, st.binary(max_size=64), st.sampled_from(["authorization", "api-key"]),
       st.sampled_from(["GET", "POST"]))
def test_the_wired_request_is_what_copy_and_headers_built(fields, body, key_header, method) -> None:
    request = http.Request.make(method, "http://127.0.0.1:8080/v1/responses?x=1", body, http.Headers(fields))
    wire = WireKeys()
    wire.attach(request, key_header, "Bearer sk-the-real-key", "Bearer PLACEHOLDER")
    before = request.get_state()
    wired = wire.on_wire_request(request)
    expected = reference(wire, request)
    assert wired is not request and wired.data is not request.data
    assert wired.get_state() == expected.get_state()
    assert type(wired.headers) is http.Headers and wired.headers.fields == expected.headers.fields
    assert vars(wired).keys() == vars(expected).keys() and vars(wired.data).keys() == vars(expected.data).keys()
    assert request.get_state() == before  # the flow's request keeps its placeholder
    assert wired.headers[key_header] == "Bearer sk-the-real-key"


def test_an_object_with_a_copy_protocol_of_its_own_is_copied_by_copy() -> None:
    class Custom:
        def __init__(self) -> None:
            self.copied = False

        def __copy__(self):
            other = Custom()
            other.copied = True
            return other

    assert _shallow_copy(Custom()).copied
