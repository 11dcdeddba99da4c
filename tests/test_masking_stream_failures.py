"""Every way a masked stream can fail ends it with the SSE error event, never with raw text (mitmproxy's harness)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json

import pytest
from mitmproxy.test import taddons, tflow

import addons.masking as masking_addon
import addons.sse_streaming as sse_streaming_addon
from auditgate.core.flow_contract import GUARD
from auditgate.masking.stream import SseStreamMasker
from tests.fake_openai import FakeOpenAI
from tests.masking_fixtures import PII_SENTENCE, PII_VALUES, shipped_rules

try:
    from compression import zstd
except ImportError:
    from backports import zstd

RAW = [v.encode() for v in PII_VALUES.values()]


def _responses_stream(end: bytes = b"\n") -> bytes:
    fake = FakeOpenAI(reply_text=PII_SENTENCE, deltas=12)
    out = b""
    for name, payload in fake.responses_events({"model": "m", "stream": True}):
        out += b"event: " + name.encode() + end + b"data: " + json.dumps(payload).encode() + end + end
    return out


@contextlib.contextmanager
def _masking(rules=None):
    addon = masking_addon.PiiMasking()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_rules=str(rules or shipped_rules()))
        try:
            yield addon
        finally:
            addon.done()


def _stream_flow(encoding: str | None = None, path: str = "/v1/responses"):
    flow = tflow.tflow(resp=True)
    flow.request.path = path
    flow.response.headers["content-type"] = "text/event-stream; charset=utf-8"
    if encoding:
        flow.response.headers["content-encoding"] = encoding
    return flow


def _run(addon, flow, chunks: list[bytes]) -> bytes:
    """What the client receives: each chunk through the installed stream callable, then the end."""
    addon.requestheaders(flow)
    addon.responseheaders(flow)
    stream = flow.response.stream
    assert callable(stream)
    out = []
    for chunk in [*chunks, b""]:
        result = stream(chunk)
        assert result != b"", "an empty chunk would end the body mid-stream"
        out += [result] if isinstance(result, bytes) else result
    asyncio.run(addon.response(flow))
    return b"".join(out)


def _error_code(received: bytes) -> str:
    last = [line for line in received.split(b"\n") if line.startswith(b"data: ")][-1]
    return json.loads(last[6:])["error"]["code"]


def _assert_ended_with_the_error(flow, received: bytes, reason: str) -> None:
    assert not [v for v in RAW if v in received], received
    assert _error_code(received) == "gateway_masking_failed"
    assert received.count(b'"error": {') == 1  # the error goes out once, as the last event
    record = flow.metadata["auditgate.masking"]
    assert record["status"] == "failed" and reason in record["reason"], record
    # An unexpected exception is named by its type and place: its message may quote the text being masked.
    assert "injected" not in record["reason"] and not [v for v in PII_VALUES.values() if v in record["reason"]]


def test_a_stream_that_cannot_be_decoded_ends_with_the_error_event():
    with _masking() as addon:
        flow = _stream_flow("gzip")
        received = _run(addon, flow, [b"\x1f\x8b not gzip at all", gzip.compress(_responses_stream())])
    _assert_ended_with_the_error(flow, received, "error")
    assert "content-encoding" not in flow.response.headers  # the error event goes out plain


def test_a_masker_failing_mid_stream_releases_what_was_masked_then_the_error(monkeypatch):
    raw = _responses_stream()
    first, rest = raw[: raw.index(b"response.output_text.delta")], raw[raw.index(b"response.output_text.delta"):]

    def broken(self, event):
        raise RuntimeError(f"injected: the masker broke on {PII_VALUES['EMAIL_ADDRESS']}")

    with _masking() as addon:
        flow = _stream_flow()
        addon.requestheaders(flow)
        addon.responseheaders(flow)
        before = flow.response.stream(first)
        monkeypatch.setattr(SseStreamMasker, "_responses_event", broken)
        after = flow.response.stream(rest)
        end = flow.response.stream(b"")
        asyncio.run(addon.response(flow))
    assert b"response.created" in before
    assert end == [] and _error_code(b"".join(after)) == "gateway_masking_failed"
    _assert_ended_with_the_error(flow, before + b"".join(after), "RuntimeError at test_masking_stream_failures.py")


def test_a_masker_failing_at_the_end_sends_the_error_not_the_held_text(monkeypatch):
    def broken(self):
        raise RuntimeError("injected: finish broke")

    monkeypatch.setattr(SseStreamMasker, "finish", broken)
    with _masking() as addon:
        flow = _stream_flow()
        received = _run(addon, flow, [_responses_stream()[:-200]])
    _assert_ended_with_the_error(flow, received, "RuntimeError")


def test_a_failure_setting_the_stream_up_still_installs_the_masker_that_refuses(monkeypatch):
    # Were this hook to raise, the next addon (sse_streaming) would stream the reply through raw.
    def broken(encoding):
        raise RuntimeError("injected: no decoder")

    monkeypatch.setattr(masking_addon, "stream_decoder", broken)
    with _masking() as addon:
        flow = _stream_flow("gzip")
        received = _run(addon, flow, [gzip.compress(_responses_stream())])
    _assert_ended_with_the_error(flow, received, "RuntimeError")


@pytest.mark.parametrize("kind", ["responses", "chat"])
def test_an_event_past_the_cap_ends_the_stream(kind, tmp_path):
    with _masking(_rules(tmp_path, "stream_event_max_bytes: 2048\n")) as addon:
        flow = _stream_flow(path="/v1/chat/completions" if kind == "chat" else "/v1/responses")
        received = _run(addon, flow, [b"data: " + PII_SENTENCE.encode() * 40])
    _assert_ended_with_the_error(flow, received, "SseEventTooLarge")
    assert received.startswith(b"event: error\n") == (kind == "responses")


def _rules(tmp_path, extra: str):
    import shutil

    rules = shutil.copytree(shipped_rules(), tmp_path / "rules")
    (rules / "masking.yaml").write_text((rules / "masking.yaml").read_text() + "\n" + extra)
    return rules


@pytest.mark.parametrize("encoding", ["zstd", "br", "gzip"])
def test_compressed_streams_are_masked(encoding):
    import brotli

    raw = _responses_stream(b"\r")
    encoded = {"zstd": zstd.compress, "br": brotli.compress, "gzip": gzip.compress}[encoding](raw)
    with _masking() as addon:
        flow = _stream_flow(encoding)
        received = _run(addon, flow, [encoded[:50], encoded[50:]])
    assert not [v for v in RAW if v in received]
    assert b"<EMAIL_ADDRESS>" in received and b"response.completed" in received
    assert flow.metadata["auditgate.masking"]["status"] == "masked"


def test_the_upstreams_content_length_is_not_passed_on():
    with _masking() as addon:
        flow = _stream_flow()
        flow.response.headers["content-length"] = "123"
        addon.requestheaders(flow)
        addon.responseheaders(flow)
    assert "content-length" not in flow.response.headers
    assert flow.response.headers["transfer-encoding"] == "chunked"


def test_a_stream_taken_back_by_a_later_hook_is_masked_whole(tmp_path):
    # The bundle's guard sets flow.response.stream = False when a later responseheaders hook fails:
    # the reply is then buffered, and must be masked (or refused) like any reply, not recorded as a stream.
    rules = _rules(tmp_path, "")
    masking_yaml = rules / "masking.yaml"  # masked in this process: no workers to wait for
    masking_yaml.write_text(masking_yaml.read_text().replace("inline_max_bytes: 4096", "inline_max_bytes: 1000000"))
    with _masking(rules) as addon:
        flow = _stream_flow()
        addon.requestheaders(flow)
        addon.responseheaders(flow)
        flow.response.stream = False
        flow.response.content = _responses_stream()
        asyncio.run(addon.response(flow))
    assert not [v for v in RAW if v in flow.response.content]
    assert flow.metadata["auditgate.masking"]["status"] == "masked", flow.metadata["auditgate.masking"]


def test_a_stream_cut_short_is_still_recorded():
    with _masking() as addon:
        flow = _stream_flow()
        addon.requestheaders(flow)
        addon.responseheaders(flow)
        flow.response.stream(_responses_stream()[:1500])
        addon.error(flow)
    assert flow.metadata["auditgate.masking"]["status"] in ("masked", "clean")
    assert "stream_ms" in flow.metadata["auditgate.masking"]


def test_sse_streaming_never_streams_a_reply_whose_hooks_failed():
    addon = sse_streaming_addon.SseStreaming()
    flow = _stream_flow()
    addon.responseheaders(flow)
    assert callable(flow.response.stream)
    flow = _stream_flow()
    GUARD.set(flow, {"addon": "key_custody", "hook": "responseheaders", "error": "RuntimeError", "action": "pending"})
    addon.responseheaders(flow)
    assert not flow.response.stream  # left buffered, for the guard to replace with its refusal
    flow = _stream_flow()
    mine = lambda data: data  # noqa: E731 - the masking addon's callable
    flow.response.stream = mine
    addon.responseheaders(flow)
    assert flow.response.stream._passing is mine
