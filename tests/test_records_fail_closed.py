"""Records and audit fail together, through a real mitmdump and the real openai SDK, faults injected from outside.

- the flows directory on a full tmpfs: new requests are refused 503 gateway_records_unavailable, never
  forwarded; a served flow whose record was lost is reported lost in the audit log, and the verifier
  says so instead of calling it tampering;
- the flow writer process stopped (SIGSTOP), then killed (SIGKILL): the gateway keeps answering within a
  second (it never waits on the pipe), refuses once too much waits for the writer, reports the records
  the dead writer held, and records again with a new writer;
- the audit file made immutable (chattr +i) mid-run: 503 gateway_audit_unavailable until it is writable;
- rules files swapped, deleted and unreadable while requests run: every reply has its entry, the
  periodic checkpoint task lives on, and the unreadable file is named in the audit log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from auditgate.audit.flow_files import read_flow_files
from auditgate.audit.verify import verify
from tests.conftest import gateway_env
from tests.fake_openai import FakeOpenAI, FakeOpenAIServer
from tests.gateway_process import BIN, ROOT, GatewayProcess

pytestmark = pytest.mark.e2e

RECORDS_UNAVAILABLE = "gateway_records_unavailable"
AUDIT_UNAVAILABLE = "gateway_audit_unavailable"


@dataclass
class Answer:
    status: int
    code: str | None
    request_sha256: str
    seconds: float
    message: str = ""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ask(client: openai.OpenAI, text: str) -> Answer:
    """One Responses call through the SDK; the exact bytes it sent are kept to find the flow's audit entry."""
    started = time.monotonic()
    try:
        raw = client.responses.with_raw_response.create(model="gpt-test", input=text)
        raw.parse()
        return Answer(raw.status_code, None, _sha(raw.http_request.content), time.monotonic() - started)
    except openai.APIStatusError as e:
        message = e.body.get("message", "") if isinstance(e.body, dict) else ""
        return Answer(e.status_code, e.code, _sha(e.response.request.content), time.monotonic() - started, message)


def _ask_until(client: openai.OpenAI, status: int, timeout: float = 10.0) -> Answer:
    deadline = time.monotonic() + timeout
    while True:
        answer = _ask(client, f"probe {uuid.uuid4().hex}")
        if answer.status == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def _entries(records: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((records / "audit").glob("audit-*.jsonl"))
            for line in path.read_bytes().splitlines() if line.endswith(b"}")]


def _auditgate_verify(records: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "python"), "-m", "auditgate", "verify", str(records)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _lost_ids(entries: list[dict]) -> set[str]:
    return {item["flow_id"] for e in entries if e["kind"] == "records_lost" for item in e["flows"]}


@pytest.fixture
def upstream_server():
    server = FakeOpenAIServer(FakeOpenAI(reply_text="Recorded answer.")).start()
    yield server
    server.stop()


def _start(tmp_path: Path, rules: Path, confdir: Path, upstream: FakeOpenAIServer, *args: str) -> GatewayProcess:
    return GatewayProcess(tmp_path / "gw", rules=rules, records=tmp_path / "records", confdir=confdir,
                          args=["--mode", f"reverse:http://127.0.0.1:{upstream.port}", *args], env=gateway_env()).start()


def _client(gateway: GatewayProcess, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=10)


def _upstream_saw(upstream: FakeOpenAIServer) -> set[str]:
    return {_sha(r.body) for r in list(upstream.fake.received)}


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f:  # fill the disk for real
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    return filler


def test_flows_on_a_full_disk_are_refused_and_each_lost_record_is_reported(tmp_path, rules_and_callers, confdir,
                                                                          upstream_server):
    rules, callers = rules_and_callers
    records = tmp_path / "records"
    flows_dir = records / "flows"
    _mount_tmpfs(flows_dir, "512k")  # the flow files get a small disk of their own; the audit log does not
    try:
        gateway = _start(tmp_path, rules, confdir, upstream_server)
        try:
            client = _client(gateway, callers.alice)
            assert _ask(client, "before the disk fills").status == 200
            filler = _fill(flows_dir)
            # The first flows after it are served and their records lost (the writer learns it after their
            # reply went out); from the writer's first error on, requests are refused.
            answers = []
            for i in range(80):
                answers.append(_ask(client, f"while full {i} {uuid.uuid4().hex}"))
                if [a.status for a in answers[-3:]] == [503, 503, 503]:
                    break
                time.sleep(0.02)
            statuses = [a.status for a in answers]
            first_refusal = statuses.index(503)
            assert statuses[first_refusal:] == [503] * (len(statuses) - first_refusal), statuses
            assert {a.code for a in answers[first_refusal:]} == {RECORDS_UNAVAILABLE}
            assert max(a.seconds for a in answers) < 1.0
            refused = answers[first_refusal:]
            # A request forwarded just before the writer's error arrived has its reply withheld (the upstream saw
            # it; the caller gets no unrecorded answer). With one caller asking in turn that is at most the first
            # refusal; every later one is refused before forwarding: the upstream never saw it.
            withheld = [a for a in refused if "withheld" in a.message]
            assert withheld in ([], refused[:1]), [a.message for a in refused]
            before_forwarding = refused[len(withheld):]
            assert before_forwarding and all("serves none until it can" in a.message for a in before_forwarding)
            assert not {a.request_sha256 for a in before_forwarding} & _upstream_saw(upstream_server)
            filler.unlink()  # space again: the gateway notices by itself (its probe write succeeds)
            assert _ask_until(client, 200).status == 200
        finally:
            gateway.stop()
        entries = _entries(records)
        flow_entries = {e["request_sha256"]: e for e in entries if e["kind"] == "flow"}
        lost = _lost_ids(entries)
        served_while_full = [a for a in answers if a.status == 200]
        assert served_while_full, "no flow was served after the disk filled"
        # Every flow has its entry; each served flow whose record did not make it is named as lost.
        assert all(a.request_sha256 in flow_entries for a in answers)
        assert {flow_entries[a.request_sha256]["flow_id"] for a in served_while_full} & lost
        recorded = {r.flow_id for f in read_flow_files(records).values() for r in f.records}
        # A refusal's record is small: it may still fit where a served flow's did not; if not, it is reported too.
        assert {flow_entries[a.request_sha256]["flow_id"] for a in refused} <= lost | recorded
        [report, *_] = [e for e in entries if e["kind"] == "records_lost"]
        assert "No space left on device" in report["reason"]

        result = verify(records)
        assert not [f for f in result.findings if f.severity == "failed"], result.summary()
        assert {f.kind for f in result.findings} <= {"record lost (reported)", "truncated flow file"}, result.summary()
        assert result.flows_lost_reported == len({e["flow_id"] for e in flow_entries.values()} & lost)
        cli = _auditgate_verify(records)
        assert cli.returncode == 3, cli.stdout + cli.stderr  # incomplete (bodies of served flows lost), not failed
        assert "record lost (reported)" in cli.stdout and "reported lost by the gateway" in cli.stdout
        assert "FAILED" not in cli.stdout
    finally:
        subprocess.run(["umount", "-l", str(flows_dir)], check=False)


def _writer_pid(gateway_pid: int, not_pid: int | None = None, timeout: float = 10.0) -> int:
    """The flow writer child of the gateway, found from outside through /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == not_pid:
                continue
            try:
                command = (entry / "cmdline").read_bytes()
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == gateway_pid and b"auditgate.recording.writer" in command:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError("no flow writer process found")


def test_a_stopped_then_killed_writer_refuses_without_stalling_and_reports_what_it_held(
        tmp_path, rules_and_callers, confdir, upstream_server):
    rules, callers = rules_and_callers
    records = tmp_path / "records"
    gateway = _start(tmp_path, rules, confdir, upstream_server, "--set", "gateway_flows_queue_mb=1")
    try:
        client = _client(gateway, callers.alice)
        assert _ask(client, "before").status == 200
        deadline = time.monotonic() + 10
        while not any(f.records for f in read_flow_files(records).values()) and time.monotonic() < deadline:
            time.sleep(0.02)  # the first flow is written: the writer is idle when it is stopped
        writer = _writer_pid(gateway.proc.pid)
        os.kill(writer, signal.SIGSTOP)  # the writer no longer reads its pipe
        try:
            # Small flows: each batch fits in the pipe, where the stopped writer holds it unwritten.
            held = []
            for i in range(3):
                time.sleep(0.1)  # each in a batch of its own
                held.append(_ask(client, f"held {i} {uuid.uuid4().hex}"))
            assert [a.status for a in held] == [200, 200, 200]
            time.sleep(0.1)  # the last one's batch goes over alone, too
            # Big ones: the pipe is full, they wait in the gateway's queue until 1 MB waits, then it refuses.
            big = "x" * 200_000
            answers = []
            for i in range(30):
                answers.append(_ask(client, f"big {i} {uuid.uuid4().hex} {big}"))
                if [a.status for a in answers[-2:]] == [503, 503]:
                    break
            statuses = [a.status for a in answers]
            assert 503 in statuses and statuses[:2] == [200, 200], statuses
            assert {a.code for a in answers if a.status == 503} == {RECORDS_UNAVAILABLE}
            # Nothing waited for the stopped writer: every answer came within a second.
            assert max(a.seconds for a in held + answers) < 1.0, [round(a.seconds, 2) for a in held + answers]
            refused = [a for a in answers if a.status == 503]
            # Refused before forwarding, or (admitted just before the queue filled) forwarded and its reply withheld.
            withheld = {a.request_sha256 for a in refused} & _upstream_saw(upstream_server)
        finally:
            os.kill(writer, signal.SIGKILL)  # a stopped process dies of SIGKILL too
        # A new writer takes over; once it has answered, requests are served again.
        assert _ask_until(client, 200).status == 200
        assert _writer_pid(gateway.proc.pid, not_pid=writer) != writer
    finally:
        gateway.stop()
    entries = _entries(records)
    by_sha = {e["request_sha256"]: e for e in entries if e["kind"] == "flow"}
    lost = _lost_ids(entries)
    # What the dead writer held in its pipe is reported lost; what still waited in the queue was handed
    # to the new writer and recorded.
    assert {by_sha[a.request_sha256]["flow_id"] for a in held} <= lost
    assert not {by_sha[a.request_sha256]["flow_id"] for a in answers if a.status == 200} & lost
    [report] = [e for e in entries if e["kind"] == "records_lost"]
    assert "killed by signal 9" in report["reason"]
    for sha in withheld:  # what the caller got instead is what the records hold
        assert by_sha[sha]["status"] == 503 and by_sha[sha]["refusal"]["code"] == RECORDS_UNAVAILABLE
    result = verify(records)
    assert not [f for f in result.findings if f.severity == "failed"], result.summary()
    assert [f.kind for f in result.findings] == ["record lost (reported)"] * len(held), result.summary()
    assert result.flows_matched == result.flow_entries - len(held)


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_an_immutable_audit_file_refuses_with_503_until_it_is_writable(tmp_path, rules_and_callers, confdir,
                                                                        upstream_server):
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    rules, callers = rules_and_callers
    records = tmp_path / "records"
    gateway = _start(tmp_path, rules, confdir, upstream_server)
    [audit_file] = sorted((records / "audit").glob("audit-*.jsonl"))
    try:
        client = _client(gateway, callers.alice)
        assert _ask(client, "before").status == 200
        if not _chattr("+i", audit_file):
            pytest.skip("chattr +i is not possible here (needs CAP_LINUX_IMMUTABLE and a filesystem that has it)")
        try:
            # The open audit file takes no more writes: the first reply whose entry fails is withheld, and
            # later requests are refused before they are forwarded.
            answers = [_ask(client, f"immutable {i} {uuid.uuid4().hex}") for i in range(4)]
        finally:
            _chattr("-i", audit_file)
        assert [(a.status, a.code) for a in answers] == [(503, AUDIT_UNAVAILABLE)] * 4
        assert not {a.request_sha256 for a in answers[1:]} & _upstream_saw(upstream_server)
        time.sleep(1.5)  # the audit log's tick finds the file writable again
        assert _ask_until(client, 200).status == 200
    finally:
        _chattr("-i", audit_file)
        gateway.stop()
    entries = _entries(records)
    assert not {a.request_sha256 for a in answers} & {e["request_sha256"] for e in entries if e["kind"] == "flow"}
    [resumed] = [e for e in entries if e["kind"] == "audit_resumed"]
    assert resumed["refused_requests"] >= 4 and "Operation not permitted" in resumed["reason"]
    result = verify(records)
    assert result.status == "verified", result.summary()
    assert {f.kind for f in result.findings} == {"refused unaudited"}
    assert len(result.findings) == resumed["refused_requests"]


def test_rules_swapped_and_unreadable_mid_run_keep_every_reply_audited_and_the_checkpoints_going(
        tmp_path, rules_and_callers, confdir, upstream_server):
    source, callers = rules_and_callers
    rules = tmp_path / "rules"
    shutil.copytree(source, rules)
    records = tmp_path / "records"
    gateway = _start(tmp_path, rules, confdir, upstream_server, "--set", "gateway_audit_checkpoint_seconds=1")
    stop = threading.Event()

    def churn() -> None:
        # Another process's work on the rules directory: files swapped in by rename, deleted, created.
        n = 0
        while not stop.is_set():
            n += 1
            for i in range(20):
                path = rules / f"extra-{i}.yaml"
                tmp = rules / f"extra-{i}.tmp.yaml"
                tmp.write_text(f"# version {n}\n")
                os.replace(tmp, path)
                if (n + i) % 3 == 0:
                    path.unlink(missing_ok=True)

    churner = threading.Thread(target=churn)
    try:
        client = _client(gateway, callers.alice)
        assert _ask(client, "before").status == 200
        # A rules file the gateway cannot read (root reads any file, but not this one).
        unreadable = rules / "notes.txt"
        if os.geteuid() == 0:
            unreadable.symlink_to("/proc/self/mem")
        else:
            unreadable.write_text("notes")
            unreadable.chmod(0)
        churner.start()
        answers = []
        for i in range(25):
            answers.append(_ask(client, f"during churn {i}"))
            time.sleep(0.1)
        stop.set()
        churner.join(10)
        time.sleep(2.5)  # the tick goes on: an interval checkpoint for the entries since
        assert _ask(client, "after").status == 200
        time.sleep(2.5)
    finally:
        stop.set()
        gateway.stop()
    assert [a.status for a in answers] == [200] * len(answers)
    entries = _entries(records)
    audited = {e["request_sha256"] for e in entries if e["kind"] == "flow"}
    assert {a.request_sha256 for a in answers} <= audited
    changed = [e for e in entries if e["kind"] == "config" and e["reason"] == "changed"]
    assert changed and all("notes.txt" not in e["files"] for e in changed)
    assert any("notes.txt" in e.get("unreadable", {}) for e in changed)
    last_flow = max(e["seq"] for e in entries if e["kind"] == "flow")
    interval = [e for e in entries if e["kind"] == "checkpoint" and e["reason"] == "interval"
                and e["signed_seq"] >= last_flow]
    assert interval, "the periodic checkpoint task stopped"
    assert "periodic tick failed" not in gateway.log()
    result = verify(records)
    assert result.status == "verified", result.summary()
