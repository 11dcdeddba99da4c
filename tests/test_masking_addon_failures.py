"""The masking addon fails closed when its worker processes cannot serve (mitmproxy's test harness, faults injected)."""

from __future__ import annotations

import asyncio
import errno
import json

from mitmproxy.test import taddons, tflow

import auditgate.masking.workers
from addons.masking import PiiMasking
from auditgate.masking.workers import MaskingBusy, MaskingWorkers
from tests.masking_fixtures import PII_SENTENCE, PII_VALUES, shipped_rules


def _big_reply_flow():
    flow = tflow.tflow(resp=True)
    flow.request.path = "/v1/responses"
    flow.response.headers["content-type"] = "application/json"
    text = " ".join([PII_SENTENCE] * 60)  # past inline_max_bytes: a job for the workers
    flow.response.content = json.dumps({"object": "response", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": text}]}]}).encode()
    return flow


def _masked_response(monkeypatch_fault) -> bytes:
    async def scenario():
        addon = PiiMasking()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, gateway_rules=str(shipped_rules()))
            monkeypatch_fault()
            flow = _big_reply_flow()
            addon.requestheaders(flow)
            addon._in_flight.add("another flow")  # others in flight: no inline masking
            await addon.response(flow)
            addon.done()
            return flow

    flow = asyncio.run(scenario())
    body = flow.response.content
    assert flow.response.status_code == 502 and json.loads(body)["error"]["code"] == "gateway_masking_failed"
    assert flow.metadata["auditgate.masking"]["status"] == "failed"
    assert not [v for v in PII_VALUES.values() if v.encode() in body]
    return body


def test_workers_that_cannot_be_started_mean_a_502_not_an_unmasked_reply(monkeypatch):
    def no_processes(module):
        raise OSError(errno.EMFILE, "Too many open files")

    _masked_response(lambda: monkeypatch.setattr(auditgate.masking.workers, "start_child", no_processes))


def test_any_unexpected_error_on_the_way_means_a_502_not_an_unmasked_reply(monkeypatch):
    async def broken(self, *args, **kwargs):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    _masked_response(lambda: monkeypatch.setattr(MaskingWorkers, "mask", broken))


def test_a_full_line_of_waiting_bodies_means_a_503_at_once_not_a_stall(monkeypatch):
    async def busy(self, *args, **kwargs):
        raise MaskingBusy("all 1 masking worker(s) are busy and 128 job(s) are waiting")

    async def scenario():
        addon = PiiMasking()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, gateway_rules=str(shipped_rules()))
            monkeypatch.setattr(MaskingWorkers, "mask", busy)
            flow = _big_reply_flow()
            addon.requestheaders(flow)
            addon._in_flight.add("another flow")
            await addon.response(flow)
            addon.done()
            return flow

    flow = asyncio.run(scenario())
    body = flow.response.content
    assert flow.response.status_code == 503 and json.loads(body)["error"]["code"] == "gateway_masking_busy"
    assert flow.metadata["auditgate.masking"]["status"] == "failed"
    assert not [v for v in PII_VALUES.values() if v.encode() in body]


def test_the_stream_and_queue_caps_have_safe_defaults():
    from auditgate.masking.config import load_masking_settings

    settings = load_masking_settings(shipped_rules())  # the shipped file does not name them
    assert settings.stream_event_max_bytes == 4 << 20 and settings.stream_max_bytes == 64 << 20
    assert settings.queue_max_jobs == 128
