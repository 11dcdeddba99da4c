"""Body limits through a real mitmdump with the bundle: compressed bombs both ways, oversized and undecodable
bodies, a capped event stream, and the start refused when stream_large_bodies is set.

The gateway runs with the default request limit (32 MB) and a 40 MB reply limit, so mitmproxy's own
body_size_limit (set by body_limits to the larger of the two) sits above the request limit, and both
the gateway's early refusal and mitmproxy's are reached. Masking is off here (no masking.yaml), so
event streams pass through body_limits' own byte cap.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from mitmproxy.exceptions import FlowReadException

from auditgate.core.flow_contract import BODY_LIMITS, REFUSAL
from auditgate.identity.service_tokens import add_service_token
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GATEWAY_SCRIPT, GatewayProcess, run_mitmdump
from tests.misbehaving_upstream import (
    MB,
    MisbehavingUpstream,
    brotli_bomb,
    gzip_bomb,
    rss_kb,
    zstd_bomb,
)
from tests.records import read_flows

pytestmark = pytest.mark.e2e

RESPONSE_MAX_MB = 40


@pytest.fixture(scope="module")
def upstream():
    server = MisbehavingUpstream().start()
    server.flood_bytes = (RESPONSE_MAX_MB + 8) * MB
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, confdir, upstream):
    root = tmp_path_factory.mktemp("body-limits")
    rules = make_rules(root / "rules", upstreams=[])
    (rules / "masking.yaml").unlink()
    token = add_service_token(rules, "alice", ["agents"])
    gateway = GatewayProcess(root / "gw", rules=rules, records=root / "records", confdir=confdir, env=gateway_env(),
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream.port}",
                                   "--set", f"gateway_response_max_mb={RESPONSE_MAX_MB}"]).start()
    gateway.token = token
    yield gateway
    gateway.stop()


@pytest.fixture
def received(upstream):
    upstream.received.clear()
    return upstream.received


def wait_for_flow(records, predicate, timeout: float = 10.0):
    """The one recorded flow matching predicate (a flow file being appended to is read again a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = [f for f in read_flows(records) if predicate(f)]
        except FlowReadException:  # the writer is in the middle of a flow
            found = []
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{len(found)} matching flows"
            return found[0]
        time.sleep(0.05)


def _client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.token, max_retries=0, timeout=20)


def _post(gateway, body: bytes, encoding: str, path: str = "/v1/responses") -> tuple[httpx.Response, float]:
    started = time.monotonic()
    reply = httpx.post(f"{gateway.url}{path}", content=body, timeout=20,
                       headers={"authorization": f"Bearer {gateway.token}", "content-type": "application/json",
                                "content-encoding": encoding})
    return reply, time.monotonic() - started


class OtherCaller:
    """Another caller's ordinary requests, one after another, while a test does its worst."""

    def __init__(self, gateway) -> None:
        self.client = _client(gateway)
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.client.responses.create(model="gpt-test", input="hello from the other caller")
            self.latencies.append(time.monotonic() - started)

    def __enter__(self) -> OtherCaller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(20)


class RssPeak:
    """The gateway process's largest resident set while the block runs, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.before, self.peak = pid, rss_kb(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.05)
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 1024


@pytest.mark.parametrize("encoding, bomb", [("gzip", gzip_bomb), ("br", brotli_bomb), ("zstd", zstd_bomb)])
def test_a_compressed_bomb_request_is_refused_within_a_second_and_other_callers_go_on(gateway, received, encoding,
                                                                                    bomb):
    body = bomb()
    assert len(body) <= 1.1 * MB  # gzip: 1 MB that inflates to 1 GB
    _client(gateway).responses.create(model="gpt-test", input="warm up")  # this caller's first-use costs aside
    received.clear()
    with RssPeak(gateway.proc.pid) as rss, OtherCaller(gateway) as other:
        time.sleep(0.1)
        reply, took = _post(gateway, body, encoding)
        time.sleep(0.2)
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["code"] == "gateway_request_too_large"
    assert took < 1.0
    assert rss.growth_mb < 50, f"the gateway grew by {rss.growth_mb:.0f} MB"
    assert other.latencies and max(other.latencies) < 1.0
    # The upstream saw only the other caller's requests.
    assert received and all(json.loads(r.body)["input"] == "hello from the other caller" for r in received)
    flow = wait_for_flow(gateway.records, lambda f: (BODY_LIMITS.read(f.metadata) or {}).get(
        "request_bytes") == len(body))
    assert REFUSAL.read(flow.metadata)["code"] == "gateway_request_too_large"
    assert BODY_LIMITS.read(flow.metadata)["request_inflated_bytes"] > 32 * MB
    assert flow.request.raw_content == b""  # the bomb itself is not kept in the records


def test_a_compressed_request_within_the_limit_goes_upstream_decoded(gateway, received):
    payload = {"model": "gpt-test", "input": "a compressed hello " * 100}
    reply, _ = _post(gateway, gzip.compress(json.dumps(payload).encode()), "gzip")
    assert reply.status_code == 200, reply.text
    [seen] = received
    assert json.loads(seen.body) == payload
    assert "content-encoding" not in seen.headers


@pytest.mark.parametrize("body, encoding", [(b"not gzip at all", "gzip"), (b"{}", "compress"),
                                            (gzip.compress(b'{"model": "x"}', mtime=0)[:-6], "gzip")],
                         ids=["not-gzip", "compress", "truncated-gzip"])
def test_a_request_body_that_does_not_decode_is_refused(gateway, received, body, encoding):
    reply, _ = _post(gateway, body, encoding)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "gateway_request_undecodable"
    assert not received


def test_a_request_over_the_limit_is_refused_once_read(gateway, received):
    # 36 MB: over the request limit (32 MB), under mitmproxy's body_size_limit (the 40 MB reply limit): the
    # gateway refuses at the headers; the body is read (so the caller sees the answer) and dropped.
    body = b'{"model": "gpt-test", "input": "' + b"x" * (36 * MB) + b'"}'
    reply = httpx.post(f"{gateway.url}/v1/responses", content=body, timeout=20,
                       headers={"authorization": f"Bearer {gateway.token}", "content-type": "application/json"})
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["code"] == "gateway_request_too_large"
    assert not received
    flow = wait_for_flow(gateway.records, lambda f: (BODY_LIMITS.read(f.metadata) or {}).get("request_bytes") == len(body))
    assert REFUSAL.read(flow.metadata)["code"] == "gateway_request_too_large"
    assert flow.request.raw_content == b""


def test_a_request_over_mitmproxys_body_size_limit_is_answered_by_mitmproxy_as_json_and_recorded(gateway, received):
    # Over every limit of the gateway: mitmproxy stops it at the headers, before any hook of ours, and
    # answers itself (made JSON by transport_errors); body_limits' error hook records the refusal.
    declared = (RESPONSE_MAX_MB + 1) * MB
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as caller:
        caller.sendall(f"POST /v1/responses HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {gateway.token}\r\n"
                       f"content-type: application/json\r\ncontent-length: {declared}\r\n\r\n".encode())
        answer = b""
        while chunk := caller.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert json.loads(body)["error"]["code"] == "gateway_request_too_large"
    assert not received
    flow = wait_for_flow(gateway.records, lambda f: f.request.headers.get("content-length") == str(declared))
    assert REFUSAL.read(flow.metadata)["code"] == "gateway_request_too_large"
    assert "authorization" not in flow.request.headers  # never authenticated, and its token not recorded


def test_a_compressed_bomb_reply_is_refused_not_passed(gateway, received):
    with RssPeak(gateway.proc.pid) as rss:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            _client(gateway).responses.create(model="gzip-bomb-reply", input="hello")
        took = time.monotonic() - started
    assert refused.value.status_code == 502
    assert refused.value.code == "gateway_response_too_large"
    assert took < 1.0
    assert rss.growth_mb < 50, f"the gateway grew by {rss.growth_mb:.0f} MB"
    flow = wait_for_flow(gateway.records, lambda f: (REFUSAL.read(f.metadata) or {}).get(
        "code") == "gateway_response_too_large" and not f.response.stream)
    assert BODY_LIMITS.read(flow.metadata)["response_bytes"] == len(gzip_bomb())
    assert len(flow.response.raw_content) < 1000  # the refusal, not the bomb


def test_an_event_stream_past_the_reply_limit_ends_with_an_error_event(gateway, received):
    stream = _client(gateway).responses.create(model="sse-flood", input="hello", stream=True)
    deltas = 0
    with pytest.raises(openai.APIError) as cut:
        for event in stream:
            deltas += event.type == "response.output_text.delta"
    assert cut.value.code == "gateway_response_too_large"
    assert 0 < deltas * 8000 <= RESPONSE_MAX_MB * MB
    flow = wait_for_flow(gateway.records, lambda f: (REFUSAL.read(f.metadata) or {}).get(
        "code") == "gateway_response_too_large" and f.request.content and b"sse-flood" in f.request.content)
    assert BODY_LIMITS.read(flow.metadata)["limit_bytes"] == RESPONSE_MAX_MB * MB


def test_stream_large_bodies_refuses_the_start(tmp_path, confdir):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    result = run_mitmdump(["-s", GATEWAY_SCRIPT, "--set", f"confdir={confdir}", "--set", "listen_host=127.0.0.1",
                           "-p", "0", "--set", f"gateway_rules={rules}", "--set", f"gateway_records={tmp_path / 'r'}",
                           "--set", "stream_large_bodies=1"], env=gateway_env())
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "auditgate refuses stream_large_bodies" in output
    assert "before the gateway's request hooks run" in output
