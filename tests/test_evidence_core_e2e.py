"""Whole-flow evidence through a real mitmdump: intents survive a kill -9 under load, a cut stream is recorded."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
import uuid

import openai
import pytest

from auditgate.audit.verify import OUTCOME_UNKNOWN, verify
from tests.conftest import gateway_env
from tests.evidence_upstream import EvidenceUpstream
from tests.gateway_process import GatewayProcess
from tests.records import read_flows

pytestmark = pytest.mark.e2e


def _entries(records):
    return [json.loads(line) for path in sorted((records / "audit").glob("audit-*.jsonl"))
            for line in path.read_bytes().splitlines() if line.endswith(b"}")]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def slow_upstream():
    server = EvidenceUpstream(delay=0.6).start()
    yield server
    server.stop()


def _gateway(tmp_path, name, rules, confdir, upstream, args=()):
    return GatewayProcess(tmp_path / name, rules=rules, records=tmp_path / f"records-{name}", confdir=confdir,
                          args=["--mode", f"reverse:http://127.0.0.1:{upstream.port}", *args], env=gateway_env())


def test_kill_9_under_load_every_request_the_upstream_received_has_its_intent(
        tmp_path, rules_and_callers, confdir, slow_upstream):
    rules, callers = rules_and_callers
    gateway = _gateway(tmp_path, "killed", rules, confdir, slow_upstream).start()
    stop = threading.Event()

    def client(n: int) -> None:
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=callers.alice, max_retries=0, timeout=10)
        for i in range(50):
            if stop.is_set():
                return
            try:
                sdk.responses.create(model="gpt-test", input=f"kill {n}-{i} {uuid.uuid4().hex}")
            except openai.APIError:
                return  # the gateway is gone

    threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    try:
        # Some replies done, and several requests in flight at the upstream (it answers after 0.6 s): kill now.
        _wait(lambda: slow_upstream.answered >= 5 and slow_upstream.in_flight >= 3, 30, "load with requests in flight")
        os.killpg(gateway.proc.pid, signal.SIGKILL)
        gateway.proc.wait(10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    records = tmp_path / "records-killed"
    received = list(slow_upstream.received)
    entries = _entries(records)
    intents = {e["request_sha256"]: e for e in entries if e["kind"] == "intent"}
    assert set(received) <= set(intents), "a request reached the upstream without its intent entry"
    outcomes = {e["intent"] for e in entries if e["kind"] == "flow" and e.get("intent")}
    unanswered = {intents[digest]["seq"] for digest in received if intents[digest]["seq"] not in outcomes}
    assert len(unanswered) >= 3  # those in flight at the kill

    result = verify(records)
    assert not [f for f in result.findings if f.severity == "failed"], result.summary()
    reported = {f.seq for f in result.findings if f.kind == OUTCOME_UNKNOWN}
    assert unanswered <= reported and result.outcome_unknown == len(reported)
    assert all("forwarded, outcome unknown (gateway stopped)" in f.message
               for f in result.findings if f.kind == OUTCOME_UNKNOWN)
    assert "forwarded with outcome unknown" in result.summary()
    instance = {e["instance"] for e in entries}
    assert len(instance) == 1 and instance != {""}


def test_a_stream_cut_mid_way_is_recorded_with_its_partial_body_and_marked_cut(
        tmp_path, rules_and_callers, confdir, slow_upstream):
    rules, callers = rules_and_callers
    gateway = _gateway(tmp_path, "cut", rules, confdir, slow_upstream).start()
    received_events = []
    try:
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=callers.alice, max_retries=0, timeout=10)
        with pytest.raises(openai.APIError):
            for event in sdk.responses.create(model="gpt-test", input="a stream to cut", stream=True):
                received_events.append(event.type)
    finally:
        gateway.stop()
    records = tmp_path / "records-cut"
    assert received_events, "the client got nothing before the cut"
    [flow] = [f for f in read_flows(records) if f.request.path.startswith("/v1/responses")]
    cut = flow.metadata["auditgate.stream_cut"]
    body = flow.response.raw_content
    assert cut["bytes_to_client"] == len(body) > 0 and flow.error is not None
    recorded_events = [line.split(b": ", 1)[1].decode() for line in body.splitlines() if line.startswith(b"event: ")]
    assert recorded_events[:len(received_events)] == received_events  # what the client got, in the record
    [entry] = [e for e in _entries(records) if e["kind"] == "flow"]
    assert entry["stream_cut"] == cut and entry["response_sha256"] == hashlib.sha256(body).hexdigest()
    assert entry["intent"] is not None
    result = verify(records)
    assert result.status == "verified", result.summary()
    assert result.streams_cut == 1 and result.intents == 1 and result.outcome_unknown == 0
