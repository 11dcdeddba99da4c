"""Approvals when things go wrong, through a real mitmdump with the bundle and the real openai SDK.

- The approvals store locked by another process (a separate Python process holding BEGIN EXCLUSIVE):
  the request that needs an approval is refused (503 gateway_approvals_unavailable), never forwarded,
  never hung; an approver's decision meanwhile is refused with a clear error; other callers are answered
  within a second all along; the audit log verifies afterwards.
- An approval never outlives its expiry: a decision after it is refused, and the store, the audit log and
  the evidence pack say expired, not approved.
- A caller that gives up: its approval is closed (expired), not left pending for someone to approve.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from auditgate.approval.store import STORE_FILE
from auditgate.core.flow_contract import APPROVAL, REFUSAL
from auditgate.identity.service_tokens import add_service_token
from tests.approval_gateway import AdminClient, StoreLocker, add_test_rules, admin_url
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import BIN, ROOT, GatewayProcess
from tests.records import wait_for_flows

pytestmark = pytest.mark.e2e

def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        started = time.monotonic()
        try:
            out["result"] = fn()
        except Exception as e:  # handed to the test
            out["error"] = e
        out["took"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _auditgate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "auditgate"), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _approval_entries(records: Path, approval_id: str) -> list[dict]:
    return [e for path in sorted((records / "audit").glob("audit-*.jsonl"))
            for e in (json.loads(line) for line in path.read_bytes().splitlines() if line.strip())
            if e.get("kind") == "approval" and e["details"].get("approval_id") == approval_id]


def _gateway(tmp_path: Path, confdir, upstream_server, *extra: str) -> tuple[GatewayProcess, dict[str, str]]:
    rules = make_rules(tmp_path / "rules", upstreams=[])
    add_test_rules(rules)
    tokens = {name: add_service_token(rules, name, groups) for name, groups in
              (("alice", ["agents"]), ("bob", ["agents", "approvers"]), ("carol", ["agents"]))}
    gateway = GatewayProcess(tmp_path / "gw", rules=rules, records=tmp_path / "records", confdir=confdir,
                             env=gateway_env(), args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}",
                                                      "--set", "approval_admin_listen=127.0.0.1:0", *extra]).start()
    return gateway, tokens


def _client(gateway: GatewayProcess, token: str, **kw) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, **kw)


def _verified(records: Path) -> None:
    verified = _auditgate("verify", records)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "VERIFIED" in verified.stdout


def test_a_store_locked_by_another_process_refuses_what_needs_approval_and_nothing_else_waits(
        tmp_path, confdir, upstream_server, upstream):
    gateway, tokens = _gateway(tmp_path, confdir, upstream_server)
    records = tmp_path / "records"
    try:
        bob = AdminClient(admin_url(gateway), tokens["bob"])
        # Held before the lock: its decision will have to wait for the store.
        held_thread, held_out = _in_thread(lambda: _client(gateway, tokens["alice"]).responses.create(
            model="gpt-test", input="held-before-lock-e2e needs-approval-marker"))
        [held] = bob.wait_pending(lambda a: "held-before-lock-e2e" in a["preview"])

        locker = StoreLocker(records / STORE_FILE)
        try:
            # Another caller's ordinary requests, back to back, all the while.
            ordinary: list[float] = []
            stop = threading.Event()

            def ordinary_traffic():
                client = _client(gateway, tokens["carol"], timeout=5)
                while not stop.is_set():
                    started = time.monotonic()
                    client.responses.create(model="gpt-test", input="ordinary-while-locked-e2e")
                    ordinary.append(time.monotonic() - started)
                    time.sleep(0.05)

            traffic_thread, traffic_out = _in_thread(ordinary_traffic)
            # Two requests needing approval at once (one queues behind the other on the store's thread).
            asks = [_in_thread(lambda: _client(gateway, tokens["alice"], timeout=30).responses.create(
                model="gpt-test", input=f"locked-store-e2e-{i} needs-approval-marker")) for i in range(2)]
            # An approver's decision while the store is locked: a clear error, nothing decided.
            status, body = bob.approve(held["id"], reason="while locked")
            assert (status, body["error"]["code"]) == (503, "approvals_unavailable"), body
            for thread, _ in asks:
                thread.join(20)
            stop.set()
            traffic_thread.join(10)
        finally:
            locker.release()

        assert "error" not in traffic_out, traffic_out.get("error")
        assert len(ordinary) >= 10 and max(ordinary) < 1.0, ordinary
        for _, out in asks:
            error = out["error"]
            assert isinstance(error, openai.InternalServerError) and error.status_code == 503, error
            assert error.code == "gateway_approvals_unavailable"
            assert error.response.headers["x-should-retry"] == "false"
            assert out["took"] < 8.0  # refused after the busy timeout (2 s by default), never held forever
        assert not [r for r in upstream.received if b"locked-store-e2e" in r.body]  # never forwarded
        assert "database is locked" in gateway.log()

        # The refusals are recorded like any other flow.
        refused = wait_for_flows(records, lambda f: b"locked-store-e2e" in (f.request.content or b""), count=2)
        for flow in refused:
            assert REFUSAL.read(flow.metadata)["code"] == "gateway_approvals_unavailable"
            assert APPROVAL.read(flow.metadata)["status"] == "store_unavailable"

        # The store is back: the approval held throughout is still pending, and deciding it works now.
        assert [a["id"] for a in bob.pending() if a["id"] == held["id"]] == [held["id"]]
        status, body = bob.approve(held["id"], reason="after the lock")
        assert status == 200 and body["status"] == "approved"
        held_thread.join(15)
        assert held_out["result"].output_text == "Hello from the fake upstream."
        assert len([r for r in upstream.received if b"held-before-lock-e2e" in r.body]) == 1
        # Its approval has one decision in the audit log: the refused one left no trace of being taken.
        decisions = [e["decision"] for e in _approval_entries(records, held["id"])]
        assert decisions == ["requested", "approved"], decisions
    finally:
        gateway.stop()
    _verified(records)


@pytest.fixture(scope="module")
def expiring(tmp_path_factory, confdir, upstream_server):
    """One gateway for the expiry tests (each makes its own approvals), with a 3 s grace for retries."""
    workdir = tmp_path_factory.mktemp("expiring")
    gateway, tokens = _gateway(workdir, confdir, upstream_server, "--set", "approval_abandoned_grace_ms=3000")
    yield gateway, tokens, AdminClient(admin_url(gateway), tokens["bob"]), workdir / "records"
    gateway.stop()


def test_a_decision_after_the_expiry_is_refused_and_recorded_as_expired(expiring, upstream, tmp_path):
    gateway, tokens, bob, records = expiring
    # The caller gives up before the expiry (1.5 s), as in the report that approved 3.4 s after it.
    client = _client(gateway, tokens["alice"], timeout=httpx.Timeout(1.0, connect=2.0))
    thread, out = _in_thread(lambda: client.responses.create(model="gpt-test",
                                                             input="late-decision-e2e times-out-marker"))
    [pending] = bob.wait_pending(lambda a: "late-decision-e2e" in a["preview"])
    thread.join(10)
    assert isinstance(out["error"], openai.APITimeoutError)
    # Just past the expiry (the gateway's clock is this machine's): approve.
    while time.time() < pending["expires_at"] + 0.05:
        time.sleep(0.01)
    status, body = bob.approve(pending["id"], reason="too late")
    # Refused: closed as expired by this very decision, or by the sweep a moment before it.
    assert status == 409 and body["error"]["code"] in ("approval_expired", "already_decided"), body
    status, shown = bob.call("GET", f"/api/approvals/{pending['id']}")
    assert shown["status"] == "expired" and shown["decided_by"] is None
    assert not [r for r in upstream.received if b"late-decision-e2e" in r.body]
    # The audit log (and so the evidence pack) counts an expiry, and no approval.
    deadline = time.monotonic() + 5
    while "expired" not in [e["decision"] for e in _approval_entries(records, pending["id"])]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    decisions = [e["decision"] for e in _approval_entries(records, pending["id"])]
    assert "approved" not in decisions and decisions.count("expired") == 1, decisions
    # The evidence pack, made from the records as they are now, counts no approval.
    snapshot = tmp_path / "records"
    shutil.copytree(records, snapshot)
    made = _auditgate("evidence", snapshot, "--out", tmp_path / "evidence")
    assert made.returncode == 0, made.stderr
    pack = json.loads((tmp_path / "evidence" / "evidence.json").read_text())
    figures = pack["figures"]
    assert figures["approvals"] == 0 and "approved" not in figures["approval_outcomes"], figures
    assert figures["approval_outcomes"]["expired"] >= 1, figures["approval_outcomes"]
    # The gateway still runs: its newest entries are chained, not yet signed; nothing else is amiss.
    assert {f["severity"] for f in pack["verification"]["findings"]} <= {"incomplete"}, pack["verification"]


def test_a_caller_that_gives_up_leaves_no_approval_pending(expiring, upstream):
    gateway, tokens, bob, records = expiring
    client = _client(gateway, tokens["alice"], timeout=httpx.Timeout(1.0, connect=2.0))
    thread, out = _in_thread(lambda: client.responses.create(model="gpt-test",
                                                             input="gave-up-e2e needs-approval-marker"))
    [pending] = bob.wait_pending(lambda a: "gave-up-e2e" in a["preview"])
    thread.join(10)
    assert isinstance(out["error"], openai.APITimeoutError)
    gave_up = time.monotonic()
    # Closed once the grace for a retry (3 s here) has passed, long before its 30 s expiry.
    deadline = gave_up + 8
    while bob.call("GET", f"/api/approvals/{pending['id']}")[1]["status"] == "pending":
        assert time.monotonic() < deadline, "the abandoned approval is still pending"
        time.sleep(0.2)
    assert time.monotonic() - gave_up >= 2.5  # not before a retry had its chance
    shown = bob.call("GET", f"/api/approvals/{pending['id']}")[1]
    assert shown["status"] == "expired" and "went away" in shown["reason"]
    status, body = bob.approve(pending["id"])
    assert (status, body["error"]["code"]) == (409, "already_decided")
    assert not [r for r in upstream.received if b"gave-up-e2e" in r.body]
    [flow] = wait_for_flows(records, lambda f: b"gave-up-e2e" in (f.request.content or b""))
    assert APPROVAL.read(flow.metadata)["status"] == "abandoned"
    decisions = [e["decision"] for e in _approval_entries(records, pending["id"])]
    assert decisions == ["requested", "expired"], decisions
