"""The audit log through a real mitmdump: an Agents SDK run, the evidence pack, a kill -9 under load, a full disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid

import httpx
import openai
import pytest

from auditgate.audit.chain import load_private_key_file, public_key_pem
from auditgate.audit.verify import verify
from tests.agent_app import run_agent, run_agent_streamed
from tests.conftest import UPSTREAM_KEY, gateway_env
from tests.fake_openai import FakeOpenAI, FakeOpenAIServer
from tests.gateway_process import BIN, ROOT, GatewayProcess
from tests.records import files_containing, read_flows

pytestmark = pytest.mark.e2e


def _entries(records):
    return [json.loads(l) for p in sorted((records / "audit").glob("audit-*.jsonl")) for l in p.read_bytes().splitlines()
            if l.endswith(b"}")]


def _sha(data):
    return hashlib.sha256(data).hexdigest() if data is not None else None


def _auditgate(*args):
    return subprocess.run([str(BIN / "auditgate"), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture
def own_upstream():
    server = FakeOpenAIServer(FakeOpenAI(reply_text="Audited answer.")).start()
    yield server
    server.stop()


def _gateway(tmp_path, name, rules, confdir, upstream, records=None, args=()):
    return GatewayProcess(tmp_path / name, rules=rules, records=records or tmp_path / "records", confdir=confdir,
                          args=["--mode", f"reverse:http://127.0.0.1:{upstream.port}", *args], env=gateway_env())


def _trusted_pubkey(confdir, tmp_path):
    """The auditor's copy of the public key, taken from the key itself rather than from the records."""
    path = tmp_path / "trusted-audit-key.pem"
    path.write_bytes(public_key_pem(load_private_key_file(confdir / "audit-signing-key.pem").public_key()))
    return path


def test_an_agent_run_is_audited_verified_and_reported(tmp_path, rules_and_callers, confdir, own_upstream, monkeypatch):
    rules, callers = rules_and_callers
    gateway = _gateway(tmp_path, "gw", rules, confdir, own_upstream).start()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{gateway.url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", callers.alice)
        assert asyncio.run(run_agent("responses")) == "Audited answer. Tool said: sunny in Paris"
        output, deltas = asyncio.run(run_agent_streamed("responses"))
        assert deltas and output.startswith("Audited answer.")
        monkeypatch.setenv("OPENAI_API_KEY", callers.bob)
        asyncio.run(run_agent("chat"))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="agt_not-a-token", max_retries=0).responses.create(model="gpt-test", input="x")
    finally:
        gateway.stop()
    records = tmp_path / "records"
    expected_per_identity = {"alice": 4, "bob": 2, "(unauthenticated)": 1}

    # Entries link to their flows: the flow file named holds the flow, with the same body digests.
    entries = _entries(records)
    flow_entries = [e for e in entries if e["kind"] == "flow"]
    flows = {f.id: f for f in read_flows(records)}
    assert len(flow_entries) == len(flows) == sum(expected_per_identity.values())
    for entry in flow_entries:
        flow = flows[entry["flow_id"]]
        assert entry["flow_file"] == flow.metadata["auditgate.flow_file"]
        assert entry["request_sha256"] == _sha(flow.request.raw_content)
        assert entry["response_sha256"] == _sha(flow.response.raw_content)
        assert entry["status"] == flow.response.status_code
    assert sum(e["streamed"] for e in flow_entries) == 2
    assert {e["model"] for e in flow_entries if not e["refusal"]} == {"gpt-test"}
    assert [e["kind"] for e in entries][-2:] == ["gateway_stop", "checkpoint"]

    pubkey = _trusted_pubkey(confdir, tmp_path)
    verified = _auditgate("verify", records, "--pubkey", pubkey)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "VERIFIED" in verified.stdout

    out = tmp_path / "evidence"
    made = _auditgate("evidence", records, "--out", out, "--pubkey", pubkey)
    assert made.returncode == 0, made.stderr
    pack = json.loads((out / "evidence.json").read_text())
    figures = pack["figures"]
    assert figures["requests_per_identity"] == expected_per_identity
    assert figures["callers"] == ["alice", "bob"]
    assert figures["refusals_by_reason"] == {"gateway_unauthenticated": 1}
    assert figures["outcomes"] == {"served": 6, "refused": 1}
    assert figures["config_in_force"]["files"]["identities.yaml"] == hashlib.sha256(
        (rules / "identities.yaml").read_bytes()).hexdigest()
    assert pack["verification"]["status"] == "verified"
    assert sum(b["served"] + b["refused"] for b in pack["timeline"]["buckets"]) == 7
    assert [c["id"] for c in pack["controls"]] == ["A.5.15", "A.5.18", "A.5.3", "A.8.15", "A.8.16", "A.8.11", "A.5.33"]
    report_md = (out / "report.md").read_text()
    report_html = (out / "report.html").read_text()
    for text in ("A.9.2", "A.6.1.2", "A.12.4", "A.18.1", "cannot show"):
        assert text in report_md and text in report_html
    assert "<svg" in report_html and "<title>" in report_html
    for external in ("<script", "<link", "src=", "url(", "@import", 'href="http'):
        assert external not in report_html

    # Nothing the gateway or the report wrote holds the upstream key or a caller token.
    assert files_containing(tmp_path, [UPSTREAM_KEY, *callers.all()]) == []
    assert not any(t in gateway.log() for t in [UPSTREAM_KEY, *callers.all()])

    # After tampering the verifier fails, naming the entry.
    tampered = tmp_path / "tampered"
    shutil.copytree(records, tampered)
    [audit_file] = sorted((tampered / "audit").glob("audit-*.jsonl"))
    lines = audit_file.read_bytes().splitlines(keepends=True)
    index = next(i for i, l in enumerate(lines) if b'"name":"bob"' in l)
    lines[index] = lines[index].replace(b'"name":"bob"', b'"name":"eve"')
    audit_file.write_bytes(b"".join(lines))
    broken = _auditgate("verify", tampered, "--pubkey", pubkey)
    assert broken.returncode == 1
    assert f"{audit_file.name}:{index + 1}" in broken.stdout and "modified" in broken.stdout


def test_kill_9_under_load_loses_no_entry_of_a_completed_flow(tmp_path, rules_and_callers, confdir, own_upstream):
    rules, callers = rules_and_callers
    gateway = _gateway(tmp_path, "gw", rules, confdir, own_upstream).start()
    completed: list[tuple[str, str]] = []  # (request digest, response digest) of responses fully received
    stop = threading.Event()
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(timeout=10) as http:
            for i in range(150):
                if stop.is_set():
                    return
                body = json.dumps({"model": "gpt-test", "input": f"crash {n}-{i} {uuid.uuid4().hex}"}).encode()
                try:
                    response = http.post(f"{gateway.url}/v1/responses", content=body,
                                         headers={"authorization": f"Bearer {callers.alice}",
                                                  "content-type": "application/json"})
                    content = response.read()
                except httpx.HTTPError:
                    return  # the gateway is gone
                if response.status_code == 200:
                    with lock:
                        completed.append((_sha(body), _sha(content)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(completed) < 60:
        time.sleep(0.02)
    os.killpg(gateway.proc.pid, signal.SIGKILL)  # mid-load, no shutdown of any kind
    gateway.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    records = tmp_path / "records"
    assert len(completed) >= 20, "the load did not get going"

    audited = {(e["request_sha256"], e["response_sha256"]) for e in _entries(records) if e["kind"] == "flow"}
    assert set(completed) <= audited  # every response a client fully received has its entry
    cut = verify(records)
    assert cut.status in ("verified", "incomplete"), cut.summary()
    assert not [f for f in cut.findings if f.severity == "failed"], cut.summary()

    # A restart notes where the crashed run stopped and signs it; the chain carries on.
    again = _gateway(tmp_path, "gw2", rules, confdir, own_upstream).start()
    try:
        assert httpx.post(f"{again.url}/v1/responses", json={"model": "gpt-test", "input": "after"},
                          headers={"authorization": f"Bearer {callers.alice}"}).status_code == 200
    finally:
        again.stop()
    [start] = [e for e in _entries(records) if e["kind"] == "gateway_start" and e.get("recovered")]
    assert start["recovered"]["last_seq"] >= max(e["seq"] for e in _entries(records) if e["kind"] == "flow"
                                                   and (e["request_sha256"], e["response_sha256"]) in set(completed))
    after = verify(records, [_trusted_pubkey(confdir, tmp_path)])
    assert after.signed_upto == after.last_seq
    assert {f.kind for f in after.findings} <= {"flow lost in crash", "truncated flow file", "outcome unknown"}, \
        after.summary()


def _mount_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def test_a_full_disk_makes_the_gateway_refuse_with_503(tmp_path, rules_and_callers, confdir, own_upstream):
    rules, callers = rules_and_callers
    records = tmp_path / "records"
    audit_dir = records / "audit"
    _mount_tmpfs(audit_dir, "128k")  # the audit log gets its own small disk
    try:
        gateway = _gateway(tmp_path, "gw", rules, confdir, own_upstream).start()
        url, headers = f"{gateway.url}/v1/responses", {"authorization": f"Bearer {callers.alice}"}
        try:
            with httpx.Client(timeout=10) as http:
                assert http.post(url, json={"model": "gpt-test", "input": "before"}, headers=headers).status_code == 200
                filler = audit_dir / "filler"
                with open(filler, "wb") as f:  # fill the disk for real
                    try:
                        while True:
                            f.write(b"\0" * 4096)
                            f.flush()
                    except OSError:
                        pass
                # A line may still fit in the audit file's last page; the first that does not fails closed.
                answered, bodies = [], {}
                for i in range(40):
                    body = json.dumps({"model": "gpt-test", "input": f"full {i}"}).encode()
                    response = http.post(url, content=body, headers=headers)
                    answered.append(response)
                    bodies[id(response)] = body
                    if len([r for r in answered if r.status_code == 503]) == 3:
                        break
                codes = [r.status_code for r in answered]
                first_refusal = codes.index(503)
                assert codes[first_refusal:] == [503, 503, 503], codes
                assert {r.json()["error"]["code"] for r in answered[first_refusal:]} == {"gateway_audit_unavailable"}
                served_while_filling = {_sha(bodies[id(r)]) for r in answered if r.status_code == 200}
                filler.unlink()  # space again: the gateway resumes by itself
                deadline, status = time.monotonic() + 10, None
                while time.monotonic() < deadline and status != 200:
                    time.sleep(0.3)
                    status = http.post(url, json={"model": "gpt-test", "input": "after"}, headers=headers).status_code
                assert status == 200
        finally:
            gateway.stop()
        entries = _entries(records)
        [resumed] = [e for e in entries if e["kind"] == "audit_resumed"]
        assert resumed["refused_requests"] >= 2
        served = [e for e in entries if e["kind"] == "flow" and e["status"] == 200]
        assert served_while_filling <= {e["request_sha256"] for e in served}  # each 200 was audited
        assert len(served) == len(served_while_filling) + 2
        result = verify(records)
        # A request forwarded (its intent written) whose outcome entry no longer fitted: its reply was withheld,
        # and the verifier pairs the intent with the refusal in the flow file instead of "outcome unknown".
        # A reply whose flow entry still fitted went out; if its record entry (written once the reply is on its
        # way) did not, the log names that flow served unaudited, and the verifier says its record is not
        # digested: incomplete, never verified, and never a failure of the records.
        assert {f.kind for f in result.findings} <= {"refused unaudited", "reply withheld", "record not digested"}
        assert "refused unaudited" in {f.kind for f in result.findings}
        undigested = [f for f in result.findings if f.kind == "record not digested"]
        assert result.status == ("incomplete" if undigested else "verified"), result.summary()
        assert all(any(i in f.message for i in resumed["unaudited_flows"]) for f in undigested)
        assert result.outcome_unknown == 0
    finally:
        subprocess.run(["umount", str(audit_dir)], check=False)


def test_a_refused_forward_connect_has_its_entry(forward_env, records_root):
    marker = uuid.uuid4().hex
    with httpx.Client(proxy=forward_env.url) as client:
        with pytest.raises(httpx.ProxyError):
            client.get(f"https://refused-{marker}.invalid/v1/models")
    records = records_root / "forward"
    [entry] = [e for e in _entries(records) if e["kind"] == "flow" and e["host"] == f"refused-{marker}.invalid"]
    assert entry["method"] == "CONNECT" and entry["status"] == 403
    assert entry["refusal"]["code"] == "gateway_forbidden" and entry["identity"] is None
    assert entry["flow_file"].startswith("flows-")
    # The gateway is still running: its log is consistent so far, and says what it cannot verify yet.
    live = verify(records)
    assert live.status in ("verified", "incomplete")
    assert not [f for f in live.findings if f.severity == "failed"], live.summary()
