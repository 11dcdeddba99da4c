"""Inflating with a cap, the body limits and upstream timeouts as logic, and both addons in mitmproxy's test harness."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import tracemalloc
import zlib

import brotli
import pytest
from mitmproxy import exceptions, http
from mitmproxy.addons import (
    mapremote,
    modifybody,
    modifyheaders,
    onboarding,
    proxyserver,
)
from mitmproxy.test import taddons, tflow

from addons.body_limits import BodySizeLimits
from addons.transport_errors import _make_error_response
from auditgate.core.flow_contract import BODY_LIMITS, REFUSAL
from auditgate.transport import timeouts
from auditgate.transport.inflate import (
    PIECE,
    BodyTooLarge,
    BodyUndecodable,
    Inflater,
    content_codings,
    inflate,
)
from auditgate.transport.limits import (
    MB,
    BodyLimits,
    StreamByteCap,
    declared_length,
    sse_error_event,
)
from auditgate.transport.timeouts import Exchange, UpstreamTimeouts, overdue

try:  # Python 3.14 has it in the standard library; the backport before
    from compression import zstd
except ImportError:
    from backports import zstd

TEXT = os.urandom(100_000) + b"a compressible tail " * 20_000
ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "raw deflate": lambda data: zlib.compress(data)[2:-4],  # what some servers send as "deflate"
    "br": brotli.compress,
    "zstd": zstd.compress,
}


def _coding(name: str) -> str:
    return "deflate" if name == "raw deflate" else name


# ---- inflating ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENCODERS)
def test_each_coding_inflates_whole_and_in_chunks(name):
    encoded = ENCODERS[name](TEXT)
    assert inflate(encoded, [_coding(name)], len(TEXT)) == TEXT
    assert inflate(encoded, [_coding(name)], len(TEXT), keep_first_pass=1000) == TEXT  # measured, then kept
    inflater = Inflater([_coding(name)], len(TEXT))
    chunks = [inflater.feed(encoded[i:i + 997]) for i in range(0, len(encoded), 997)]
    assert b"".join(chunks) + inflater.finish() == TEXT


@pytest.mark.parametrize("name", ENCODERS)
def test_each_coding_stops_just_past_the_limit(name):
    encoded = ENCODERS[name](TEXT)
    with pytest.raises(BodyTooLarge) as too_large:
        inflate(encoded, [_coding(name)], len(TEXT) - 1)
    assert len(TEXT) - 1 < too_large.value.inflated <= len(TEXT) - 1 + 2 * PIECE
    inflater = Inflater([_coding(name)], 50_000)
    with pytest.raises(BodyTooLarge):
        for i in range(0, len(encoded), 997):
            inflater.feed(encoded[i:i + 997])


@pytest.mark.parametrize("name", ENCODERS)
def test_a_cut_short_or_corrupt_body_does_not_decode(name):
    encoded = ENCODERS[name](TEXT)
    with pytest.raises(BodyUndecodable):
        inflate(encoded[:-20], [_coding(name)], 10 * MB)
    with pytest.raises(BodyUndecodable):
        inflate(b"\x00\x01 not compressed at all " * 10, [_coding(name)], 10 * MB)


def test_gzip_members_and_stacked_codings_are_all_decoded():
    members = gzip.compress(b"first ") + b"\0\0" + gzip.compress(b"second")
    assert inflate(members, ["gzip"], 100) == b"first second"
    stacked = brotli.compress(gzip.compress(TEXT))  # Content-Encoding: gzip, br (applied in that order)
    assert inflate(stacked, content_codings("gzip, br"), len(TEXT)) == TEXT
    with pytest.raises(BodyUndecodable, match="after the end"):
        inflate(zlib.compress(b"x") + b"more", ["deflate"], 100)
    for coding in ("gzip", "deflate", "br", "zstd"):
        assert inflate(b"", [coding], 10) == b""


def test_only_codings_the_gateway_decodes_are_accepted():
    assert content_codings("") == [] and content_codings("identity") == []
    assert content_codings("GZIP, br") == ["gzip", "br"]
    for header in ("compress", "bzip2", "gzip, rot13"):
        with pytest.raises(BodyUndecodable, match="unsupported"):
            content_codings(header)


@pytest.mark.parametrize("encode", [
    lambda: gzip.compress(bytes(16 * MB), 9) * 8,  # 128 MB of zeros in gzip members
    lambda: zstd.compress(bytes(16 * MB)) * 8,
])
def test_a_bomb_costs_a_pieces_worth_of_memory_not_the_limits(encode):
    bomb = encode()
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge):
            inflate(bomb, ["gzip" if bomb[:2] == b"\x1f\x8b" else "zstd"], 32 * MB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MB, f"{peak / MB:.1f} MB"


# ---- limits ---------------------------------------------------------------------------------------------
def test_limits_are_whole_megabytes_and_at_least_one():
    limits = BodyLimits.from_megabytes(32, 64)
    assert (limits.request_bytes, limits.response_bytes, limits.largest) == (32 * MB, 64 * MB, 64 * MB)
    with pytest.raises(ValueError, match="gateway_request_max_mb"):
        BodyLimits.from_megabytes(0, 64)
    assert declared_length(" 42 ") == 42 and declared_length("-1") is None and declared_length(None) is None


def test_a_stream_past_its_cap_ends_with_one_error_event_and_drops_the_rest():
    end = sse_error_event("responses", 502, "gateway_response_too_large", "too much")
    cut = []
    cap = StreamByteCap(10, end, lambda: cut.append(True))
    assert cap(b"12345") == b"12345"
    assert cap(b"67890") == b"67890"
    assert not cut
    assert cap(b"1") == [end]
    assert cut == [True]
    assert cap(b"more") == []
    assert cap(b"") == []  # the end of the stream adds nothing (never b"" mid-stream)
    assert cap.exceeded and cap.received == 15
    event = json.loads(end.decode().split("data: ", 1)[1])
    assert event["type"] == "error" and event["error"]["code"] == "gateway_response_too_large"
    chat = sse_error_event("chat", 504, "gateway_upstream_timeout", "late")
    assert chat.startswith(b"data: ") and json.loads(chat[6:])["error"]["code"] == "gateway_upstream_timeout"


# ---- upstream timeouts ----------------------------------------------------------------------------------
def test_the_first_byte_clock_starts_when_the_request_leaves_not_while_it_is_held():
    limits = UpstreamTimeouts(connect=10, first_byte=120, idle=60)
    held = Exchange()  # its request hooks (an approval, say) still running: not waiting on the upstream
    assert overdue(held, limits, now=10_000) is None
    sent = Exchange(sent=1000.0)
    assert overdue(sent, limits, now=1119) is None
    assert overdue(sent, limits, now=1120).phase == "first_byte"


def test_the_idle_clock_runs_from_the_latest_activity_after_the_headers():
    limits = UpstreamTimeouts(connect=10, first_byte=120, idle=60)
    streaming = Exchange(sent=1000.0, headers=1001.0, activity=1050.0)
    assert overdue(streaming, limits, now=1109) is None
    assert overdue(streaming, limits, now=1110).phase == "idle"
    assert overdue(Exchange(sent=1000.0, headers=1001.0, done=True), limits, now=5000) is None
    assert timeouts.connect_overdue(None, limits, now=5000) is False  # still queued: not connecting yet
    assert timeouts.connect_overdue(1000.0, limits, now=1010) is True


def test_timeouts_must_be_positive_and_are_read_a_few_times_per_timeout():
    with pytest.raises(ValueError, match="gateway_upstream_idle_timeout_ms"):
        UpstreamTimeouts(connect=10, first_byte=120, idle=0)
    assert UpstreamTimeouts(1, 1, 1).tick == 0.25
    assert UpstreamTimeouts(10, 120, 60).tick == 1.0
    assert timeouts.unmarked(timeouts.marked("late")) == "late" and timeouts.unmarked("server closed") is None


def test_mitmproxys_error_page_says_what_the_gateway_means():
    head, _, body = _make_error_response(502, timeouts.marked("no reply within 1 s")).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504") and b"x-should-retry: false" in head
    assert json.loads(body)["error"] == {"message": "no reply within 1 s", "type": "server_error", "param": None,
                                         "code": "gateway_upstream_timeout"}
    head, _, body = _make_error_response(413, "Request body exceeds mitmproxy's body_size_limit.").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["error"]["code"] == "gateway_request_too_large"
    head, _, body = _make_error_response(502, "connection refused").partition(b"\r\n\r\n")
    assert json.loads(body)["error"]["code"] == "gateway_upstream_unavailable" and b"x-should-retry" not in head


# ---- the body_limits addon ------------------------------------------------------------------------------
def _mitmproxys_own() -> list:
    """The mitmproxy addons that declare the options body_limits checks (the harness loads none by itself); ahead
    of the gateway's addon, as mitmdump loads its own before any script."""
    return [proxyserver.Proxyserver(), mapremote.MapRemote(), modifybody.ModifyBody(), modifyheaders.ModifyHeaders(),
            onboarding.Onboarding()]


@pytest.mark.parametrize("option, value", [
    ("stream_large_bodies", "1"), ("map_remote", ["|example.com|other.example"]), ("modify_body", ["/~q/a/b"]),
    ("modify_headers", ["/~q/x-extra/1"]), ("validate_inbound_headers", False), ("onboarding", True),
])
def test_options_that_would_let_bytes_past_the_hooks_are_refused(option, value):
    addon = BodySizeLimits()
    with taddons.context(*_mitmproxys_own(), addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=option):
            tctx.configure(addon, **{option: value})


def test_mitmproxys_onboarding_app_is_off_from_the_addons_load_on():
    # On by default in mitmproxy (it answers http://mitm.it/ before any hook of the gateway): turned off when
    # the addon loads, before any server listens; turning it on again is refused (above).
    with taddons.context(onboarding.Onboarding()) as tctx:
        assert tctx.options.onboarding is True
        tctx.master.addons.add(BodySizeLimits())
        assert tctx.options.onboarding is False


def test_mitmproxys_own_body_limit_is_brought_down_to_the_largest_of_the_gateways():
    addon = BodySizeLimits()
    with taddons.context(*_mitmproxys_own(), addon) as tctx:
        tctx.configure(addon, gateway_request_max_mb=2, gateway_response_max_mb=3)
        addon.running()  # set once the proxy runs (not in configure, where a rollback could loop)
        assert tctx.options.body_size_limit == str(3 * MB)
        tctx.configure(addon, body_size_limit="1m")  # lower: the operator's stands
        assert tctx.options.body_size_limit == "1m"
        tctx.configure(addon, body_size_limit="1g")
        assert tctx.options.body_size_limit == str(3 * MB)
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, gateway_response_max_mb=0)


def _compressed_request(body: bytes, encoding: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.path = "/v1/responses"
    flow.request.headers["content-type"] = "application/json"
    flow.request.headers["content-encoding"] = encoding
    flow.request.raw_content = body
    return flow


def _run(addon, hook: str, flow, **options):
    async def scenario():
        with taddons.context(addon) as tctx:
            tctx.configure(addon, **options)
            result = getattr(addon, hook)(flow)
            if asyncio.iscoroutine(result):
                await result
    asyncio.run(scenario())
    return flow


def test_a_compressed_request_is_replaced_by_its_decoded_body():
    payload = json.dumps({"model": "m", "input": "hello " * 2000}).encode()  # large enough for the worker thread
    flow = _run(BodySizeLimits(), "request", _compressed_request(gzip.compress(payload), "gzip"))
    assert flow.response is None
    assert flow.request.raw_content == payload and "content-encoding" not in flow.request.headers
    assert flow.request.headers["content-length"] == str(len(payload))
    assert BODY_LIMITS.get(flow)["request_inflated_bytes"] == len(payload)


def test_a_request_that_inflates_past_the_limit_is_refused_and_not_kept():
    bomb = gzip.compress(bytes(3 * MB))
    flow = _run(BodySizeLimits(), "request", _compressed_request(bomb, "gzip"), gateway_request_max_mb=2)
    assert flow.response.status_code == 413
    assert REFUSAL.get(flow)["code"] == "gateway_request_too_large"
    sizes = BODY_LIMITS.get(flow)
    assert sizes["request_bytes"] == len(bomb) and sizes["limit_bytes"] == 2 * MB
    assert 2 * MB < sizes["request_inflated_bytes"] < 3 * MB
    assert flow.request.raw_content == b""


def test_a_request_that_does_not_decode_is_refused():
    flow = _run(BodySizeLimits(), "request", _compressed_request(b"plain text", "gzip"))
    assert flow.response.status_code == 400 and REFUSAL.get(flow)["code"] == "gateway_request_undecodable"
    flow = _run(BodySizeLimits(), "request", _compressed_request(b"x", "compress"))
    assert REFUSAL.get(flow)["code"] == "gateway_request_undecodable"


def test_a_compressed_reply_is_decoded_or_refused_before_masking_sees_it():
    payload = b'{"output_text": "hi"}'
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-encoding"] = "br"
    flow.response.raw_content = brotli.compress(payload)
    _run(BodySizeLimits(), "response", flow)
    assert flow.response.raw_content == payload and "content-encoding" not in flow.response.headers
    bomb = tflow.tflow(resp=True)
    bomb.response.headers["content-encoding"] = "zstd"
    bomb.response.raw_content = zstd.compress(bytes(2 * MB))
    _run(BodySizeLimits(), "response", bomb, gateway_response_max_mb=1)
    assert bomb.response.status_code == 502 and REFUSAL.get(bomb)["code"] == "gateway_response_too_large"
    assert BODY_LIMITS.get(bomb)["limit_bytes"] == MB
