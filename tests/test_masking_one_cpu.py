"""Confined to one CPU, the masking addon masks small bodies in-process even with other flows in flight.

Workers buy parallelism on other CPUs; on one CPU they only add two pickles and two context switches per
body. The process's real CPU affinity is set for the test (and put back), nothing is patched; with the
worker pool taken away, a body that went to a worker would be refused (502), one masked in-process is 200.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from mitmproxy.test import taddons, tflow

from addons.masking import PiiMasking
from tests.masking_fixtures import PII_SENTENCE, PII_VALUES, shipped_rules

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")


def _small_reply_flow():
    flow = tflow.tflow(resp=True)
    flow.request.path = "/v1/responses"
    flow.response.headers["content-type"] = "application/json"
    flow.response.content = json.dumps({"object": "response", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": PII_SENTENCE}]}]}).encode()
    return flow


def _mask_with_others_in_flight(cpus: set[int]):
    before = os.sched_getaffinity(0)

    async def scenario():
        addon = PiiMasking()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, gateway_rules=str(shipped_rules()))
            addon._stop_workers(wait=0)  # no pool: a body sent to a worker is refused
            flow = _small_reply_flow()
            addon.requestheaders(flow)
            addon._in_flight.add("another flow")
            os.sched_setaffinity(0, cpus)
            try:
                await addon.response(flow)
            finally:
                os.sched_setaffinity(0, before)
            return flow

    return asyncio.run(scenario())


def test_one_cpu_masks_a_small_body_in_process_with_other_flows_in_flight():
    flow = _mask_with_others_in_flight({min(os.sched_getaffinity(0))})
    body = flow.response.content
    assert flow.response.status_code == 200, body
    assert not [v for v in PII_VALUES.values() if v.encode() in body]
    assert flow.metadata["auditgate.masking"]["status"] == "masked"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_several_cpus_send_it_to_a_worker_and_without_one_it_is_refused_not_passed():
    flow = _mask_with_others_in_flight(set(sorted(os.sched_getaffinity(0))[:2]))
    body = flow.response.content
    assert flow.response.status_code == 502 and json.loads(body)["error"]["code"] == "gateway_masking_failed"
    assert not [v for v in PII_VALUES.values() if v.encode() in body]
