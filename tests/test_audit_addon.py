"""The audit log addon in mitmproxy's own test harness: written inside the hook, fail closed, recovery, rotation."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons.audit_log import AuditLog
from addons.flow_recorder import FlowRecorder
from auditgate.audit.chain import create_private_key_file, key_id, load_private_key_file
from auditgate.audit.verify import verify
from auditgate.core.flow_contract import AuditUnavailable, services


def _entries(records):
    return [json.loads(l) for p in sorted((records / "audit").glob("audit-*.jsonl")) for l in p.read_bytes().splitlines()]


def _flow(body=b'{"model": "gpt-4o-mini", "input": "hi"}'):
    flow = tflow.tflow(resp=True)
    flow.request.content = body
    flow.metadata["auditgate.identity"] = {"name": "alice", "groups": ["agents"], "method": "service_token"}
    flow.metadata["auditgate.masking"] = {"status": "masked", "findings": [
        {"entity_type": "EMAIL_ADDRESS", "count": 2, "path": "input", "direction": "request"}]}
    return flow


@pytest.fixture
def setup(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "upstreams.yaml").write_text("upstreams: []\n")
    return tmp_path, rules


def _configure(tctx, recorder, log, tmp_path, rules, **extra):
    tctx.configure(recorder, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules))
    tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                   confdir=str(tmp_path / "conf"), **extra)


def test_the_entry_is_on_disk_when_the_response_hook_returns(setup):
    tmp_path, rules = setup
    recorder, log = FlowRecorder(), AuditLog()
    with taddons.context(recorder, log) as tctx:
        _configure(tctx, recorder, log, tmp_path, rules)
        flow = _flow()
        recorder.response(flow)
        assert log.response(flow) is None  # fsync=checkpoint: nothing to wait for
        # No event loop turn has happened: the line was written inside the hook.
        [entry] = [e for e in _entries(tmp_path / "records") if e["kind"] == "flow"]
        assert entry["flow_id"] == flow.id and entry["model"] == "gpt-4o-mini" and entry["status"] == 200
        assert entry["flow_file"] == flow.metadata["auditgate.flow_file"]
        assert entry["identity"]["name"] == "alice"
        assert entry["masking"]["findings"] == [{"count": 2, "direction": "request", "entity_type": "EMAIL_ADDRESS",
                                                 "path": "input"}]
        log.done()
        recorder.done()
    kinds = [e["kind"] for e in _entries(tmp_path / "records")]
    assert kinds[:3] == ["gateway_start", "config", "checkpoint"] and kinds[-2:] == ["gateway_stop", "checkpoint"]
    assert (tmp_path / "conf" / "audit-signing-key.pem").stat().st_mode & 0o777 == 0o600
    assert verify(tmp_path / "records").status == "verified"


def test_a_full_disk_refuses_new_requests_until_the_log_is_writable_again(setup):
    tmp_path, rules = setup

    async def scenario():
        recorder, log = FlowRecorder(), AuditLog()
        with taddons.context(recorder, log) as tctx:
            _configure(tctx, recorder, log, tmp_path, rules)
            log.running()
            fd = log.writer._fd
            saved = os.dup(fd)
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)  # from here on every write to the audit file fails with ENOSPC, as on a full disk
            try:
                in_flight = _flow()
                recorder.response(in_flight)
                log.response(in_flight)
                # Its response had not been sent: the caller gets the refusal, not an unrecorded answer.
                assert in_flight.response.status_code == 503
                assert in_flight.metadata["auditgate.refusal"]["code"] == "gateway_audit_unavailable"
                assert log.unavailable
                _assert_closed(log)
                log.tick()  # still full: stays closed
                assert log.unavailable
                await asyncio.sleep(0)  # the recorder writes the refused flow
            finally:
                os.dup2(saved, fd)  # space again
                os.close(saved)
                os.close(full)
            log.tick()
            assert log.unavailable is None
            served = _flow()
            served.response = None
            log.request(served)
            assert served.response is None  # served again
            log.done()
            recorder.done()

    asyncio.run(scenario())
    entries = _entries(tmp_path / "records")
    [resumed] = [e for e in entries if e["kind"] == "audit_resumed"]
    assert resumed["refused_requests"] == 1 and resumed["unavailable_since"] and resumed["unaudited_flows"] == []
    result = verify(tmp_path / "records")
    assert result.status == "verified", result.summary()
    assert [f.kind for f in result.findings] == ["refused unaudited"]


class _HeldFsync:
    """os.fsync as the addon sees it: calls on the audit file are recorded and, while armed, held until
    released (as a slow disk would); every other descriptor is synced at once."""

    def __init__(self, monkeypatch) -> None:
        self.real = os.fsync
        self.audit_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file to hold
        self.armed = False
        self.error: OSError | None = None
        self.entered, self.release = threading.Event(), threading.Event()
        self.events: list[str] = []  # "fsync started" / "fsync returned" / "hook finished", in order
        self.covered: list[bytes] = []  # the audit file's bytes when each held fsync started
        self.path = None
        monkeypatch.setattr(os, "fsync", self)

    def hold(self, path) -> None:
        # A checkpoint's fsync, started in a thread just before, may be held too (no flow waits on it).
        st = os.stat(path)
        self.audit_file, self.path, self.armed = (st.st_dev, st.st_ino), path, True

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        if not self.armed or (st.st_dev, st.st_ino) != self.audit_file:
            return self.real(fd)
        self.covered.append(self.path.read_bytes())
        self.events.append("fsync started")
        self.entered.set()
        self.release.wait(15)
        if self.error is not None:
            self.events.append("fsync failed")
            raise self.error
        self.real(fd)
        self.events.append("fsync returned")


def _assert_closed(log: AuditLog) -> None:
    """Fail closed: a new request is refused with 503 and no approval can be recorded."""
    new = _flow()
    new.response = None
    log.request(new)
    assert new.response.status_code == 503
    assert json.loads(new.response.content)["error"]["code"] == "gateway_audit_unavailable"
    with pytest.raises(AuditUnavailable):
        services.audit_events.append_event("approval", {"flow_id": new.id, "decision": "approved"})


def test_approvals_are_entries_and_fsync_entry_waits_for_the_disk(setup, monkeypatch):
    tmp_path, rules = setup
    disk = _HeldFsync(monkeypatch)

    async def scenario():
        log = AuditLog()
        with taddons.context(log) as tctx:
            tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                           confdir=str(tmp_path / "conf"), gateway_audit_fsync="entry")
            log.running()
            entry = services.audit_events.append_event("approval", {
                "flow_id": "f1", "requester": "alice", "approver": "bob", "decision": "approved",
                "reason": "change ticket 42", "details": {"ticket": "CHG-42"}})
            assert entry["kind"] == "approval" and entry["details"] == {"ticket": "CHG-42"}
            disk.hold(log.writer.path)
            flow = _flow()
            waiter = log.response(flow)
            assert asyncio.iscoroutine(waiter)
            hook = asyncio.ensure_future(waiter)
            hook.add_done_callback(lambda _: disk.events.append("hook finished"))
            assert await asyncio.to_thread(disk.entered.wait, 10), "the response hook never asked for an fsync"
            await asyncio.sleep(0.3)
            # The disk has not answered: the hook (so the response's end) is still waiting for it.
            assert not hook.done() and set(disk.events) == {"fsync started"}
            # An fsync it may be waiting for started after the flow's entry was written to the file.
            assert [c for c in disk.covered if flow.id.encode() in c]
            disk.release.set()
            await asyncio.wait_for(hook, 10)
            assert "fsync returned" in disk.events
            assert disk.events.index("fsync returned") < disk.events.index("hook finished")
            [flow_entry] = [e for e in _entries(tmp_path / "records") if e.get("flow_id") == flow.id]
            assert log._synced_seq >= flow_entry["seq"] > entry["seq"]
            disk.armed = False
            log.done()

    asyncio.run(scenario())
    kinds = [e["kind"] for e in _entries(tmp_path / "records")]
    assert "approval" in kinds and "flow" in kinds
    assert services.audit_events is None


def test_an_fsync_error_with_fsync_entry_closes_the_gateway(setup, monkeypatch):
    tmp_path, rules = setup
    disk = _HeldFsync(monkeypatch)
    disk.error = OSError(errno.EIO, "Input/output error")

    async def scenario():
        log = AuditLog()
        with taddons.context(log) as tctx:
            tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                           confdir=str(tmp_path / "conf"), gateway_audit_fsync="entry")
            log._ensure_started()  # no periodic tick: it would try to resume while the disk still fails
            disk.hold(log.writer.path)
            waiter = log.response(_flow())
            assert asyncio.iscoroutine(waiter)
            hook = asyncio.ensure_future(waiter)
            assert await asyncio.to_thread(disk.entered.wait, 10)
            await asyncio.sleep(0.1)
            assert not hook.done() and log.unavailable is None
            disk.release.set()
            await asyncio.wait_for(hook, 10)  # the failed fsync ends the wait: no flow hangs on a broken disk
            assert "fsync failed" in disk.events and "fsync returned" not in disk.events
            assert log.unavailable and "Input/output error" in log.unavailable
            # Fail closed: nothing more is served, nor decided, until the log is durable again.
            _assert_closed(log)
            disk.armed = False
            log.done()

    asyncio.run(scenario())


def test_key_rotation_and_config_changes_are_entries(setup):
    tmp_path, rules = setup
    log = AuditLog()
    with taddons.context(log) as tctx:
        tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                       confdir=str(tmp_path / "conf"))
        log._ensure_started()
        key_path = tmp_path / "conf" / "audit-signing-key.pem"
        old_id = key_id(load_private_key_file(key_path).public_key())
        old_public = (tmp_path / "records" / "audit" / "public-key.pem").read_bytes()
        (tmp_path / "old.pem").write_bytes(old_public)
        new_key = create_private_key_file(key_path.with_name(key_path.name + ".next"))
        (rules / "upstreams.yaml").write_text("upstreams: []\npassthrough: []\n")
        log._next_rules_check = 0
        log.tick()
        assert not key_path.with_name(key_path.name + ".next").exists()
        assert key_id(load_private_key_file(key_path).public_key()) == key_id(new_key.public_key()) != old_id
        log.writer.append("event", {})
        log.done()
    entries = _entries(tmp_path / "records")
    [rotation] = [e for e in entries if e["kind"] == "key_rotation"]
    assert rotation["old_key_id"] == old_id
    configs = [e for e in entries if e["kind"] == "config"]
    assert [c["reason"] for c in configs] == ["start", "changed"]
    assert configs[0]["files"]["upstreams.yaml"] != configs[1]["files"]["upstreams.yaml"]
    # An auditor holding only the old public key follows the rotation.
    assert verify(tmp_path / "records", [tmp_path / "old.pem"], check_flows=False).status == "verified"


def test_the_signing_key_may_not_live_among_the_records(setup):
    tmp_path, rules = setup
    log = AuditLog()
    with taddons.context(log) as tctx:
        with pytest.raises(exceptions.OptionsError, match="inside the records directory"):
            tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                           gateway_audit_key=str(tmp_path / "records" / "key.pem"))


def test_a_damaged_last_entry_stops_the_gateway_at_start(setup):
    tmp_path, rules = setup
    log = AuditLog()
    with taddons.context(log) as tctx:
        tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                       confdir=str(tmp_path / "conf"))
        log._ensure_started()
        log.done()
    [path] = (tmp_path / "records" / "audit").glob("audit-*.jsonl")
    path.write_bytes(path.read_bytes().replace(b'"reason":"shutdown"', b'"reason":"shutdowN"'))
    again = AuditLog()
    with taddons.context(again) as tctx:
        with pytest.raises(exceptions.OptionsError, match="cannot be continued"):
            tctx.configure(again, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                           confdir=str(tmp_path / "conf"))


def test_a_log_that_cannot_even_start_keeps_the_gateway_closed_then_starts_it(setup):
    tmp_path, rules = setup
    log = AuditLog()
    with taddons.context(log) as tctx:
        tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                       confdir=str(tmp_path / "conf"))
        log.writer._open_next(time.time())  # the file is open, the disk is already full
        fd = log.writer._fd
        saved, full = os.dup(fd), os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        try:
            log._ensure_started()
            assert log.unavailable
            refused = _flow()
            refused.response = None
            log.request(refused)
            assert refused.response.status_code == 503
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            os.close(full)
        log.tick()
        assert log.unavailable is None
        log.done()
    kinds = [e["kind"] for e in _entries(tmp_path / "records")]
    assert kinds[:4] == ["gateway_start", "config", "checkpoint", "audit_resumed"]
    assert verify(tmp_path / "records", check_flows=False).status == "verified"
