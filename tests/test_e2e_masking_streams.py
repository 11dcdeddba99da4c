"""End to end, against a misbehaving upstream: odd SSE framing, compression bombs, a masking worker killed
mid-job, and later hooks failing after the stream masker is in place. A real mitmdump with the bundle,
the real openai SDK; faults come from outside (the upstream's bytes, a signal, a test-only addon)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from tests.conftest import gateway_env, make_rules
from tests.fake_openai import FakeOpenAI
from tests.gateway_process import ROOT, GatewayProcess
from tests.masking_fixtures import MASKED_SENTENCE, PII_SENTENCE, PII_VALUES
from tests.records import files_containing, wait_for_flows

pytestmark = pytest.mark.e2e

RAW = list(PII_VALUES.values())
EVENT_CAP, STREAM_CAP = 256 << 10, 512 << 10
GUARD_FAULTS = ROOT / "tests" / "fault_injection_addon.py"  # the bundle guard's test-only addon


def _sse(events, end: bytes) -> bytes:
    out = b""
    for name, payload in events:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        out += (b"event: " + name.encode() + end if name else b"") + b"data: " + data.encode() + end + end
    return out


def _gzip_bomb(prefix: bytes, block: bytes, total: int) -> bytes:
    """gzip of prefix + block repeated to `total` bytes: a few hundred KB on the wire."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    out = [compressor.compress(prefix)]
    big = block * max(1, (1 << 20) // len(block))
    for _ in range(total // len(big)):
        out.append(compressor.compress(big))
    out.append(compressor.flush())
    return b"".join(out)


class Upstream:
    """What the misbehaving upstream sends, chosen by a marker in the request's input."""

    def __init__(self) -> None:
        self.fake = FakeOpenAI(reply_text=PII_SENTENCE, deltas=17)
        self.bombs: dict[str, bytes] = {}
        self.replied: list[str] = []  # markers of the replies sent in full

    def reply(self, body: dict) -> tuple[dict[str, str], bytes]:
        marker = json.dumps(body.get("input") or body.get("messages"))
        sse = {"content-type": "text/event-stream"}
        responses = list(self.fake.responses_events({"model": "m", "stream": True}))
        if "cr-framing" in marker:
            # Bare CR line ends, and personal data in every field an event may carry.
            email = PII_VALUES["EMAIL_ADDRESS"]
            extra = f": note for {email}\rid: {email}\rx-trace: {email}\r".encode()
            return sse, extra + _sse(responses, b"\r")
        if "cr-chat" in marker:
            chunks = [(None, c) for c in self.fake.chat_chunks({"model": "m", "stream": True})]
            return sse, _sse([*chunks, (None, "[DONE]")], b"\r")
        if "bomb-line" in marker:
            return dict(sse, **{"content-encoding": "gzip"}), self.bombs["line"]
        if "bomb-events" in marker:
            return dict(sse, **{"content-encoding": "gzip"}), self.bombs["events"]
        if "big-json" in marker:
            return {"content-type": "application/json"}, json.dumps(
                self.fake.responses_json({"model": "m"}) | {"output": [{"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": " ".join([PII_SENTENCE] * 1500)}]}]}).encode()
        return {"content-type": "application/json"}, json.dumps(self.fake.responses_json({"model": "m"})).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: "_Server"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        headers, data = self.server.upstream.reply(body)
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for at in range(0, len(data), 16384):
                piece = data[at:at + 16384]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the gateway hung up (it ended the stream): expected for a bomb
            return
        self.server.upstream.replied.append(json.dumps(body.get("input") or body.get("messages")))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream


@pytest.fixture(scope="module")
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture(scope="module")
def stream_gateway(tmp_path_factory, confdir, rules_and_callers, upstream):
    server = _Server(upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = tmp_path_factory.mktemp("streams")
    rules = make_rules(work / "rules", upstreams=[])
    (rules / "identities.yaml").write_text((rules_and_callers[0] / "identities.yaml").read_text())
    masking = rules / "masking.yaml"
    text = masking.read_text().replace("workers: 0", "workers: 1").replace("inline_max_bytes: 4096", "inline_max_bytes: 0")
    masking.write_text(text + f"\nstream_event_max_bytes: {EVENT_CAP}\nstream_max_bytes: {STREAM_CAP}\n")
    scripts = ["-s", str(ROOT / "tests" / "masking_fault_addon.py")]
    if GUARD_FAULTS.exists():
        scripts += ["-s", str(GUARD_FAULTS)]
    gateway = GatewayProcess(work / "gw", rules=rules, records=work / "records", confdir=confdir,
                             args=[*scripts, "--mode", f"reverse:http://127.0.0.1:{server.server_address[1]}"],
                             env=gateway_env()).start()
    gateway.fault_injection = GUARD_FAULTS.exists()
    yield gateway
    gateway.stop()
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(stream_gateway, callers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stream_gateway.url}/v1", api_key=callers.alice, max_retries=0, timeout=30)


def _no_raw(text: str) -> None:
    assert not [v for v in RAW if v in text], text


# ---- framing ---------------------------------------------------------------------------------------------
def test_a_stream_framed_with_bare_cr_is_masked(client, stream_gateway):
    events = list(client.responses.create(model="gpt-test", input="cr-framing", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == MASKED_SENTENCE
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[0].content[0].text == MASKED_SENTENCE
    _no_raw("".join(e.model_dump_json() for e in events))
    [flow] = wait_for_flows(stream_gateway.records, lambda f: b"cr-framing" in (f.request.content or b""))
    assert flow.metadata["auditgate.masking"]["status"] == "masked"
    _no_raw(flow.response.get_text())
    assert b"x-trace" not in flow.response.content  # an unknown field is dropped, not passed


def test_a_chat_stream_framed_with_bare_cr_is_masked(client):
    chunks = list(client.chat.completions.create(model="gpt-test", stream=True,
                                                 messages=[{"role": "user", "content": "cr-chat"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == MASKED_SENTENCE


# ---- compression bombs -----------------------------------------------------------------------------------
def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.parametrize("bomb", ["line", "events"])
def test_a_gzip_sse_bomb_ends_with_the_error_event_and_rss_stays_bounded(client, stream_gateway, upstream, bomb):
    if bomb == "line":  # one event that never ends: 200 MB of one data line
        upstream.bombs["line"] = _gzip_bomb(b"data: ", b"A" * 4096, 200 << 20)
    else:  # endless small, valid events: 100 MB of them
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "la " * 60}, "finish_reason": None}]}
        upstream.bombs["events"] = _gzip_bomb(b"", b"data: " + json.dumps(chunk).encode() + b"\n\n", 100 << 20)
    assert len(upstream.bombs[bomb]) < 1 << 20
    pid = stream_gateway.proc.pid
    before = _rss_kb(pid)
    peak, done = [before], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.append(_rss_kb(pid))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    received = []
    try:
        with pytest.raises(openai.APIError) as info:
            for chunk in client.chat.completions.create(model="gpt-test", stream=True,
                                                        messages=[{"role": "user", "content": f"bomb-{bomb}"}]):
                received.append(chunk)
    finally:
        done.set()
        watcher.join()
    assert info.value.code == "gateway_masking_failed"
    grown_mb = (max(peak) - before) / 1024
    assert grown_mb < 50, f"the proxy grew by {grown_mb:.0f} MB"
    if bomb == "events":  # the events within the cap were masked and released, then the error
        assert 0 < sum(len(c.choices[0].delta.content or "") for c in received if c.choices) <= STREAM_CAP
    [flow] = wait_for_flows(stream_gateway.records, lambda f: f"bomb-{bomb}".encode() in (f.request.content or b""))
    assert flow.metadata["auditgate.masking"]["status"] == "failed"
    assert ("SseEventTooLarge" if bomb == "line" else "StreamTooLarge") in flow.metadata["auditgate.masking"]["reason"]


# ---- a masking worker killed from outside -------------------------------------------------------------------
def _workers_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"auditgate.masking.workers" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_worker_killed_mid_job_refuses_its_flows_and_later_ones_are_served(client, stream_gateway, upstream):
    [worker] = _workers_of(stream_gateway.proc.pid)
    markers = [f"big-json-{i}" for i in range(3)]

    def ask(marker: str):
        try:
            return client.responses.create(model="gpt-test", input=marker)
        except openai.APIStatusError as e:
            return e

    with ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(ask, m) for m in markers]
        deadline = time.monotonic() + 20
        while not all(any(m in r for r in upstream.replied) for m in markers) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the replies are with the gateway: one being masked by the worker, the rest in line
        os.kill(worker, signal.SIGKILL)
        results = [a.result(60) for a in answers]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert refused, "the job the worker held was not refused"
    for r in refused:
        assert r.status_code == 502 and r.code == "gateway_masking_failed"
        _no_raw(r.response.text)
    for r in results:
        if not isinstance(r, openai.APIStatusError):
            _no_raw(r.output_text)
            assert "<EMAIL_ADDRESS>" in r.output_text
    # A fresh worker takes the next bodies.
    deadline = time.monotonic() + 30
    while True:
        later = ask("big-json-later")
        if not isinstance(later, openai.APIStatusError) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not isinstance(later, openai.APIStatusError), later
    _no_raw(later.output_text)
    replacement = _workers_of(stream_gateway.proc.pid)
    assert replacement and worker not in replacement


# ---- hooks failing after the stream masker is in place ---------------------------------------------------------
def test_a_later_addon_raising_in_responseheaders_leaves_the_stream_masked(client):
    events = list(client.responses.create(model="gpt-test", input="cr-framing", stream=True,
                                          extra_headers={"x-test-raise-after-masking": "1"}))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == MASKED_SENTENCE
    _no_raw("".join(e.model_dump_json() for e in events))


@pytest.mark.parametrize("hook", ["masking.responseheaders", "key_custody.responseheaders",
                                  "sse_streaming.responseheaders"])
def test_a_bundle_hook_failing_on_a_stream_never_lets_raw_text_out(client, stream_gateway, hook):
    if not stream_gateway.fault_injection:
        pytest.skip("the bundle guard's fault-injection addon is not there")
    received = []
    try:
        for event in client.responses.create(model="gpt-test", input="cr-framing", stream=True,
                                             extra_headers={"x-test-fault": hook}):
            received.append(event.model_dump_json())
    except openai.APIStatusError as e:  # refused before anything was sent: the guard's refusal
        assert e.status_code >= 500 and e.code in ("gateway_internal_error", "gateway_masking_failed")
        received.append(e.response.text)
    except openai.APIError as e:  # or the stream ended with the error event
        assert e.code == "gateway_masking_failed"
    _no_raw("".join(received))


def test_no_raw_personal_data_in_any_record(stream_gateway, client):
    client.responses.create(model="gpt-test", input="json-reply")  # at least one flow of its own
    assert wait_for_flows(stream_gateway.records, lambda f: b"json-reply" in (f.request.content or b""))
    assert files_containing(stream_gateway.records, RAW) == []
