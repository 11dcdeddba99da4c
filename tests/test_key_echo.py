"""The key scrub and the key on the wire, without a running proxy: every chunking, every spelling, no key out."""

from __future__ import annotations

import gc
import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.http import Headers, Request
from mitmproxy.test import taddons, tflow, tutils

from auditgate.core.addon_files import load_addon_module
from auditgate.core.shipped import SHIPPED_RULES
from auditgate.routing.key_echo import (
    ByteStreamScrubber,
    KeyEchoes,
    ReplyStreamScrubber,
    marker,
)
from auditgate.routing.key_on_wire import PLACEHOLDER, WIRE, WireKeys
from tests.fake_openai import FakeOpenAI
from tests.gateway_process import ROOT

AZURE = "0123456789abcdef0123456789abcdef"
SK = "sk-proj-Ab/c+d_e-f9"


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def test_every_spelling_of_a_key_is_found_and_lengths_are_kept():
    echoes = KeyEchoes([AZURE, SK])
    for spelled in (AZURE, SK, "sk-proj-Ab%2Fc%2Bd_e-f9", "sk-proj-Ab%2fc%2bd_e-f9", "sk-proj-Ab\\/c+d_e-f9"):
        data = f'{{"message": "bad key {spelled}"}}'.encode()
        scrubbed, found = echoes.scrub(data)
        assert found == 1 and spelled.encode() not in scrubbed and len(scrubbed) == len(data), spelled
    assert marker(32) == "[upstream-key-removed]**********" and marker(5) == "*****"
    assert KeyEchoes([]).scrub(b"anything") == (b"anything", 0) and not KeyEchoes([None, ""])


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_a_key_split_across_chunks_is_caught_and_only_a_possible_key_start_is_held(cuts):
    body = f"id: {AZURE}\nx {AZURE[:10]} y 0123 {SK}{AZURE}\n".encode()
    scrubber = ByteStreamScrubber(KeyEchoes([AZURE, SK]))
    out = b"".join(scrubber.feed(chunk) for chunk in _chunked(body, cuts)) + scrubber.finish()
    assert out == KeyEchoes([AZURE, SK]).scrub(body)[0]
    assert AZURE.encode() not in out and SK.encode() not in out


def test_the_byte_scrub_holds_back_nothing_that_cannot_begin_a_key():
    scrubber = ByteStreamScrubber(KeyEchoes([AZURE]))
    assert scrubber.feed(b"data: {}\n\n") == b"data: {}\n\n"  # an event leaves at once
    assert scrubber.feed(b"data: 0123") == b"data: "  # "0123" may begin the key
    assert scrubber.feed(b"x\n\n") == b"0123x\n\n"


def _events(text: str, encoding: str | None = None) -> bytes:
    fake = FakeOpenAI(reply_text=text, deltas=9)
    data = "".join(f"event: {n}\ndata: {json.dumps(p)}\n\n" for n, p in fake.responses_events({"input": "x"})).encode()
    return gzip.compress(data) if encoding == "gzip" else data


def _delta_text(stream: bytes) -> str:
    text = ""
    for block in stream.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = json.loads(line[6:])
                if payload.get("type") == "response.output_text.delta":
                    text += payload["delta"]
    return text


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=25), gzipped=st.booleans())
def test_a_key_spelled_over_text_deltas_never_leaves_a_stream(cuts, gzipped):
    text = f"Your key is {AZURE}, and again {AZURE}."
    scrubber = ReplyStreamScrubber(KeyEchoes([AZURE]), event_stream=True, codings=["gzip"] if gzipped else None)
    out = b"".join(scrubber.feed(c) for c in _chunked(_events(text, "gzip" if gzipped else None), cuts))
    out += scrubber.finish()
    assert AZURE.encode() not in out
    assert _delta_text(out) == text.replace(AZURE, marker(len(AZURE)))
    assert scrubber.found >= 2


# ---- the key on the wire -------------------------------------------------------------------------------------------
def test_only_the_attached_request_gets_the_key_and_only_in_its_header():
    wire = WireKeys()
    request = Request.make("POST", "http://127.0.0.1/v1/responses", b"{}", {"x-other": PLACEHOLDER})
    wire.attach(request, "authorization", f"Bearer {AZURE}", f"Bearer {PLACEHOLDER}")
    assert request.headers["authorization"] == f"Bearer {PLACEHOLDER}"
    fields = dict(wire.on_wire_fields(request, list(request.headers.fields)))
    assert fields[b"authorization"] == f"Bearer {AZURE}".encode() and fields[b"x-other"] == PLACEHOLDER.encode()
    wired = wire.on_wire_request(request)
    assert wired is not request and wired.headers["authorization"] == f"Bearer {AZURE}"
    assert AZURE not in str(request.headers.fields)  # the flow's own request never holds it
    copy = request.copy()  # a replayed or exported copy of the flow is not the request that was attached
    assert wire.on_wire_request(copy) is copy
    wire.detach(request)
    assert wire.on_wire_request(request) is request and wire.pending == 0


def test_a_request_that_is_gone_leaves_no_key_behind():
    wire = WireKeys()
    request = Request.make("GET", "http://127.0.0.1/v1/models")
    wire.attach(request, "api-key", AZURE, PLACEHOLDER)
    assert wire.pending == 1
    del request
    gc.collect()
    assert wire.pending == 0


def test_reply_headers_lose_the_key_in_names_and_values():
    wire = WireKeys()
    wire.echoes = KeyEchoes([AZURE])
    headers = Headers([(b"x-request-id", AZURE.encode()), (f"x-{AZURE}".encode(), b"1"), (b"x-fine", b"yes")])
    assert wire.scrub_headers(headers) == 2
    assert AZURE not in str(headers.fields) and headers["x-fine"] == "yes"


# ---- the addon, in mitmproxy's test harness -------------------------------------------------------------------------
@pytest.fixture
def key_custody(tmp_path, monkeypatch):
    import shutil

    rules = tmp_path / "rules"
    shutil.copytree(SHIPPED_RULES, rules)
    (rules / "upstreams.yaml").write_text("upstreams:\n  - host: api.openai.com\n    organization: org-gw\n")
    monkeypatch.setenv("OPENAI_API_KEY", AZURE)
    module = load_addon_module(ROOT / "addons", "key_custody")
    addon = module.KeyCustody()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_rules=str(rules))
        yield addon
    addon.done()
    WIRE.echoes = KeyEchoes(())


def _flow(body: bytes = b"{}") -> tflow.HTTPFlow:
    flow = tflow.tflow()
    flow.request = tutils.treq(host="api.openai.com", port=443, path="/v1/responses", content=body,
                               headers=Headers(authorization="Bearer agt_caller", cookie="a=b",
                                               openai_project="proj_caller", user_agent="OpenAI/Python 3"))
    return flow


def test_the_flow_carries_a_placeholder_the_gateways_organization_and_only_forwarded_headers(key_custody):
    flow = _flow()
    key_custody.request(flow)
    headers = flow.request.headers
    assert headers["authorization"] == f"Bearer {PLACEHOLDER}" and AZURE not in str(headers.fields)
    assert headers["openai-organization"] == "org-gw" and "openai-project" not in headers and "cookie" not in headers
    assert headers["user-agent"] == "OpenAI/Python 3"
    assert WIRE.on_wire_request(flow.request).headers["authorization"] == f"Bearer {AZURE}"
    flow.response = tutils.tresp(headers=Headers(location=f"https://x.example/?k={AZURE}"), content=AZURE.encode())
    key_custody.responseheaders(flow)
    key_custody.response(flow)
    assert "authorization" not in flow.request.headers and WIRE.on_wire_request(flow.request) is flow.request
    assert AZURE not in flow.response.headers["location"] and AZURE.encode() not in flow.response.content


def test_a_compressed_reply_is_scrubbed_decoded_and_sent_in_its_encoding(key_custody):
    flow = _flow()
    key_custody.request(flow)
    assert flow.request.headers["accept-encoding"] == "identity"
    body = json.dumps({"error": {"message": f"bad key {AZURE}"}}).encode()
    flow.response = tutils.tresp(headers=Headers(content_type="application/json", content_encoding="gzip"),
                                 content=gzip.compress(body))
    key_custody.responseheaders(flow)
    key_custody.response(flow)
    assert flow.response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(flow.response.raw_content) == body.replace(AZURE.encode(), marker(32).encode())


def test_a_stream_goes_through_the_earlier_callable_and_gets_it_back_at_the_end(key_custody):
    flow = _flow()
    key_custody.request(flow)
    flow.response = tutils.tresp(headers=Headers(content_type="text/event-stream"), content=None)
    seen = []

    def masking_stream(data: bytes):
        seen.append(data)
        return data.upper() if data else []

    flow.response.stream = masking_stream
    key_custody.responseheaders(flow)
    stream = flow.response.stream
    assert stream is not masking_stream
    out = stream(b": " + AZURE[:9].encode()) + stream(AZURE[9:].encode() + b"\n\n") + stream(b"")
    assert AZURE.upper().encode() not in b"".join(out) and seen[-1] == b""
    assert flow.response.stream is masking_stream  # masking and body_limits find their own at the response


def test_an_earlier_byte_cap_still_looks_like_itself_while_the_stream_runs(key_custody):
    from auditgate.transport.limits import StreamByteCap

    flow = _flow()
    key_custody.request(flow)
    flow.response = tutils.tresp(headers=Headers(content_type="text/event-stream"), content=None)
    cap = flow.response.stream = StreamByteCap(10, b"event: error\ndata: {}\n\n")
    key_custody.responseheaders(flow)
    assert flow.response.stream is not cap and isinstance(flow.response.stream, StreamByteCap)
    flow.response.stream(b"data: 0123456789abcdef\n\n")
    assert flow.response.stream.exceeded and flow.response.stream.limit == 10
    flow.response.stream(b"")
    assert flow.response.stream is cap


def test_a_stream_the_gateway_cannot_decode_ends_with_an_error_event(key_custody):
    flow = _flow()
    key_custody.request(flow)
    flow.response = tutils.tresp(headers=Headers(content_type="text/event-stream", content_encoding="compress"),
                                 content=None)
    key_custody.responseheaders(flow)
    out = b"".join(flow.response.stream(b"\x1f\x9d" + AZURE.encode()))
    assert AZURE.encode() not in out and b"gateway_key_custody_failed" in out
    assert flow.response.stream(b"more") == [] and "content-encoding" not in flow.response.headers


def test_a_key_json_escaped_anywhere_in_a_document_is_scrubbed_keys_and_duplicates_too():
    from auditgate.routing.key_echo import scrub_json

    echoes = KeyEchoes([SK])
    escaped = "\\u0073" + json.dumps(SK)[2:-1]  # "s" as a JSON escape: no byte spelling of the key matches
    for document in ('{"type":"error","error":{"param":"' + escaped + '"}}',
                     '{"type":"x","detail":{"' + escaped + '":1}}',
                     '{"type":"x","param":"' + escaped + '","param":null}',
                     '[{"deep":["' + escaped + '"]}]'):
        assert echoes.scrub(document.encode())[1] == 0  # the byte scrub alone misses it
        scrubbed, found = scrub_json(echoes, document.encode())
        assert found == 1 and SK not in json.dumps(json.loads(scrubbed, object_pairs_hook=list))
    clean = b'{"type":"x","text":"\\n nothing"}'
    assert scrub_json(echoes, clean) == (clean, 0) and scrub_json(echoes, b"not json") == (b"not json", 0)
