"""Witnessed checkpoints through a real mitmdump: sent to a directory and an HTTP endpoint as the log is written,
a restored older copy of the records refused at start, and requests refused while no witness takes them."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import ThreadingHTTPServer

import openai
import pytest

from auditgate.audit.witness import DirectoryWitness, HttpWitness, read_log_facts
from auditgate.cli import main as auditgate
from tests.conftest import gateway_env
from tests.fake_openai import FakeOpenAI, FakeOpenAIServer
from tests.gateway_process import ROOT, GatewayProcess
from tests.test_witness import _WitnessEndpoint

pytestmark = pytest.mark.e2e


def _witness_addon_args() -> list[str]:
    """The bundle lists audit_witness once the lead adds it; until then it is loaded beside the bundle."""
    listed = '"audit_witness"' in (ROOT / "addons" / "gateway.py").read_text()
    return [] if listed else ["-s", str(ROOT / "addons" / "audit_witness.py")]


@pytest.fixture(scope="module")
def witness_upstream():
    """This module's own upstream (not conftest's shared, per-test reset `upstream`, whose name it once shadowed)."""
    server = FakeOpenAIServer(FakeOpenAI(reply_text="Witnessed answer.")).start()
    yield server
    server.stop()


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WitnessEndpoint)
    server.records, server.write_only, server.post_status = [], False, 204
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _gateway(tmp_path, name, rules, confdir, upstream, records, witness, *extra):
    return GatewayProcess(tmp_path / name, rules=rules, records=records, confdir=confdir, env=gateway_env(), args=[
        "--mode", f"reverse:http://127.0.0.1:{upstream.port}", *_witness_addon_args(),
        "--set", f"gateway_witness={witness}", *extra])


def _client(gateway, token):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0)


def _wait_for(condition, timeout=15.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _served(client):
    try:
        return client.responses.create(model="gpt-test", input="hello").output_text
    except openai.APIStatusError as e:
        return e


def test_checkpoints_reach_both_witnesses_refusals_while_neither_takes_them_and_a_restored_copy_cannot_start(
        tmp_path, rules_and_callers, confdir, witness_upstream, endpoint, capsys):
    rules, callers = rules_and_callers
    records, witness_dir = tmp_path / "records", tmp_path / "witness-volume"
    url = f"http://127.0.0.1:{endpoint.server_port}/witness"
    gateway = _gateway(tmp_path, "gw", rules, confdir, witness_upstream, records, f"dir:{witness_dir},{url}",
                       "--set", "gateway_audit_checkpoint_entries=2", "--set", "gateway_audit_checkpoint_seconds=1",
                       "--set", "gateway_witness_max_lag=1").start()
    try:
        client = _client(gateway, callers.alice)
        for _ in range(2):
            assert _served(client) == "Witnessed answer."
        log_id = _wait_for(lambda: read_log_facts(records).log_id, what="the log's first entry")
        flow_seq = max(json.loads(line)["seq"] for p in (records / "audit").glob("audit-*.jsonl")
                       for line in p.read_text().splitlines() if '"kind":"flow"' in line)
        directory = DirectoryWitness(witness_dir)
        _wait_for(lambda: (directory.latest(log_id) or {}).get("seq", 0) > flow_seq, what="a checkpoint after the flows")
        old_copy = tmp_path / "old-copy"
        shutil.copytree(records, old_copy)  # what an insider keeps, to restore later

        # Both witnesses fail from outside: the SIEM answers 503, the witness volume is replaced by a file.
        endpoint.post_status = 503
        witness_dir.rename(tmp_path / "witness-volume-away")
        witness_dir.write_text("not a directory")
        error = _wait_for(lambda: (lambda r: r if isinstance(r, openai.APIStatusError) else None)(_served(client)),
                          what="a refusal while no witness takes checkpoints")
        assert error.status_code == 503 and error.body["code"] == "gateway_witness_unavailable"
        endpoint.post_status = 204  # one witness back is enough
        assert _wait_for(lambda: _served(client) == "Witnessed answer.", what="service once a witness is back")
        witness_dir.unlink()
        (tmp_path / "witness-volume-away").rename(witness_dir)
    finally:
        gateway.stop()

    facts = read_log_facts(records)
    assert facts.last_checkpoint[1]["reason"] == "shutdown"
    assert directory.latest(log_id)["seq"] == facts.last_seq  # the shutdown checkpoint was sent at stop
    assert HttpWitness(url).latest(log_id)["seq"] == facts.last_seq
    entries = [json.loads(line) for p in sorted((records / "audit").glob("audit-*.jsonl"))
               for line in p.read_text().splitlines()]
    down = next(e for e in entries if e["kind"] == "witness_unavailable")
    assert {w["witness"] for w in down["witnesses"]} == {f"dir:{witness_dir}", url}
    assert any("answered 503" in (w["error"] or "") for w in down["witnesses"])
    resumed = next(e for e in entries if e["kind"] == "witness_resumed")
    refused = [e for e in entries if e["kind"] == "flow" and (e.get("refusal") or {}).get("code") ==
               "gateway_witness_unavailable"]
    assert refused and resumed["refused_requests"] == len(refused)  # each refusal recorded like any request
    assert all(e.get("intent") is None for e in refused)  # refused at the headers: never about to go upstream
    assert auditgate(["verify", str(records), "--witness", f"dir:{witness_dir}", "--witness", url]) == 0
    assert "witnessed" in capsys.readouterr().out

    shutil.rmtree(records)
    shutil.copytree(old_copy, records)
    assert auditgate(["verify", str(records), "--witness", f"dir:{witness_dir}"]) == 1
    assert "cut tail" in capsys.readouterr().out
    # The witness addon alone is what refuses (no need to load the whole bundle to see it).
    restarted = GatewayProcess(tmp_path / "gw-restored", rules=rules, records=records, confdir=confdir,
                               env=gateway_env(), script=str(ROOT / "addons" / "audit_witness.py"),
                               args=["--set", f"gateway_witness=dir:{witness_dir},{url}"])
    with pytest.raises(RuntimeError) as refused_start:
        restarted.start()
    restarted.stop()
    message = str(refused_start.value)
    assert "refusing to start" in message and f"witness dir:{witness_dir} holds checkpoint seq" in message
    assert f"witness {url} holds checkpoint seq" in message and "an older copy of the log was restored" in message
