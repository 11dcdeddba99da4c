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

    async def scenario():
        flow = _flow()
        log.requestheaders(flow)  # the flow's first hook: the instance that serves it, on it from then on
        recorder.response(flow)
        assert log.response(flow) is None  # fsync=checkpoint: nothing to wait for
        # No event loop turn has happened: the line was written inside the hook.
        [entry] = [e for e in _entries(tmp_path / "records") if e["kind"] == "flow"]
        assert entry["flow_id"] == flow.id and entry["model"] == "gpt-4o-mini" and entry["status"] == 200
        assert entry["flow_file"] == flow.metadata["auditgate.flow_file"]
        assert entry["identity"]["name"] == "alice"
        assert entry["masking"]["findings"] == [{"count": 2, "direction": "request", "entity_type": "EMAIL_ADDRESS",
                                                 "path": "input"}]
        assert entry["v"] == 3 and entry["instance"] == flow.metadata["auditgate.instance"] != ""
        assert "record" not in entry  # the record's digest follows once the recorder takes the record
        assert [e for e in _entries(tmp_path / "records") if e["kind"] == "record"] == []
        for _ in range(2):  # the reply goes out; then the recorder takes the record, and the log its digest
            await asyncio.sleep(0)
        [record] = [e for e in _entries(tmp_path / "records") if e["kind"] == "record"]
        assert record["flow"] == entry["seq"] and record["flow_id"] == flow.id
        assert set(record["record"]["fields"]) >= {"request.path", "response.status_code", "metadata.auditgate.identity"}
        recorder.done()  # the bundle's order: the recorder's last records first, then the log closes
        log.done()

    with taddons.context(recorder, log) as tctx:
        _configure(tctx, recorder, log, tmp_path, rules)
        asyncio.run(scenario())
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
            response, served.response = served.response, None
            log.requestheaders(served)
            log.request(served)
            assert served.response is None  # served again
            served.response = response
            recorder.response(served)
            log.response(served)
            recorder.done()  # the bundle's order: the recorder's last records first, then the log closes
            log.done()

    asyncio.run(scenario())
    entries = _entries(tmp_path / "records")
    [resumed] = [e for e in entries if e["kind"] == "audit_resumed"]
    # The reply in flight (withheld) and the new request (refused before forwarding).
    assert resumed["refused_requests"] == 2 and resumed["unavailable_since"] and resumed["unaudited_flows"] == []
    result = verify(tmp_path / "records")
    assert result.status == "verified", result.summary()
    assert [f.kind for f in result.findings] == ["refused unaudited"]


def test_a_record_is_taken_two_loop_turns_after_its_hook_not_with_an_earlier_flows(setup):
    """mitmproxy sends a reply a loop turn after its hooks end: the record (and its record entry) is taken two
    turns on, a flow recorded meanwhile at its own time, not with the flow before it (whose reply is out)."""
    tmp_path, rules = setup
    recorder, log = FlowRecorder(), AuditLog()
    first, second = _flow(), _flow()

    def recorded() -> list[str]:
        return [e["flow_id"] for e in _entries(tmp_path / "records") if e["kind"] == "record"]

    async def scenario():
        for flow in (first, second):
            log.requestheaders(flow)
        recorder.response(first)
        log.response(first)
        await asyncio.sleep(0)
        assert recorded() == []  # one turn on: the first flow's reply is not out yet
        recorder.response(second)
        log.response(second)
        await asyncio.sleep(0)
        assert recorded() == [first.id]  # two turns on: the first flow's record; the second's is not due
        await asyncio.sleep(0)
        assert recorded() == [first.id, second.id]
        recorder.done()
        log.done()

    with taddons.context(recorder, log) as tctx:
        _configure(tctx, recorder, log, tmp_path, rules)
        asyncio.run(scenario())
    assert verify(tmp_path / "records").status == "verified"


@pytest.mark.parametrize("resumed_by", ["tick", "shutdown"])
def test_a_full_disk_as_the_record_is_taken_closes_the_log_and_owns_up_to_the_flow(setup, resumed_by):
    """The reply went out with its flow entry; the record entry, written once the recorder takes the record, hits
    a full disk: the log closes (new requests refused), the record is still written, and the log names the flow
    as served unaudited when it resumes: at its next tick, or at shutdown if that comes first. verify: a known
    gap, not tampering."""
    tmp_path, rules = setup
    served = _flow()

    async def scenario():
        recorder, log = FlowRecorder(), AuditLog()
        with taddons.context(recorder, log) as tctx:
            _configure(tctx, recorder, log, tmp_path, rules)
            log.running()
            log.requestheaders(served)
            recorder.response(served)
            log.response(served)
            assert served.response.status_code == 200 and not log.unavailable  # the reply goes out, entry written
            fd = log.writer._fd
            saved = os.dup(fd)
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)  # from here on every write to the audit file fails with ENOSPC, as on a full disk
            try:
                for _ in range(2):  # the reply goes out; then the recorder takes the record
                    await asyncio.sleep(0)
                assert log.unavailable and "No space left" in log.unavailable
                _assert_closed(log)
            finally:
                os.dup2(saved, fd)  # space again
                os.close(saved)
                os.close(full)
            if resumed_by == "tick":
                log.tick()
                assert log.unavailable is None
            recorder.done()
            log.done()

    asyncio.run(scenario())
    entries = _entries(tmp_path / "records")
    [resumed] = [e for e in entries if e["kind"] == "audit_resumed"]
    assert resumed["unaudited_flows"] == [served.id] and not [e for e in entries if e["kind"] == "record"]
    assert [e["kind"] for e in entries][-2:] == ["gateway_stop", "checkpoint"]
    result = verify(tmp_path / "records")
    assert [(f.severity, f.kind) for f in result.findings] == [("incomplete", "record not digested")], result.summary()
    assert served.id in result.findings[0].message


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
            flow = _flow()
            waiter = log.response(flow)
            assert asyncio.iscoroutine(waiter)
            hook = asyncio.ensure_future(waiter)
            assert await asyncio.to_thread(disk.entered.wait, 10)
            await asyncio.sleep(0.1)
            assert not hook.done() and log.unavailable is None
            disk.release.set()
            await asyncio.wait_for(hook, 10)  # the failed fsync ends the wait: no flow hangs on a broken disk
            assert "fsync failed" in disk.events and "fsync returned" not in disk.events
            assert log.unavailable and "Input/output error" in log.unavailable
            # Its entry may not be on disk: the reply it waited for is withheld, not released.
            assert flow.response.status_code == 503
            assert flow.metadata["auditgate.refusal"]["code"] == "gateway_audit_unavailable"
            # Fail closed: nothing more is served, nor decided, until the log is durable again.
            _assert_closed(log)
            disk.armed = False
            log.tick()  # durable again: the outage is on record, naming the withheld reply
            assert log.unavailable is None
            log.done()
        return flow.id

    withheld = asyncio.run(scenario())
    [resumed] = [e for e in _entries(tmp_path / "records") if e["kind"] == "audit_resumed"]
    assert resumed["withheld_flows"] == [withheld] and "Input/output error" in resumed["reason"]


def test_an_fsync_error_at_rotation_closes_the_gateway(setup, monkeypatch):
    tmp_path, rules = setup
    real_fsync, failed = os.fsync, []

    def fsync(fd):  # the disk fails the old file's flush once it is rotated away from
        if os.fstat(fd).st_ino == rotated_away:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    async def scenario():
        nonlocal rotated_away
        log = AuditLog()
        with taddons.context(log) as tctx:
            tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                           confdir=str(tmp_path / "conf"))
            log._ensure_started()
            await asyncio.sleep(0.1)  # the start checkpoint's own fsync
            rotated_away = os.stat(log.writer.path).st_ino
            monkeypatch.setattr(os, "fsync", fsync)
            log.writer._day_end = 0  # midnight: the next entry opens a new file
            first = _flow()
            log.response(first)
            assert first.response.status_code == 200 and log.writer.path.stat().st_ino != rotated_away
            deadline = time.monotonic() + 5
            while not log.unavailable and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the old file is synced in a thread, off the loop
            assert failed and "Input/output error" in log.unavailable
            _assert_closed(log)
            monkeypatch.setattr(os, "fsync", real_fsync)
            log.tick()
            assert log.unavailable is None
            log.done()

    rotated_away = None
    asyncio.run(scenario())
    assert verify(tmp_path / "records", check_flows=False).status == "verified"


def test_any_error_building_an_entry_refuses_the_reply_and_is_on_record(setup):
    tmp_path, rules = setup

    async def scenario():
        log = AuditLog()
        with taddons.context(log) as tctx:
            tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                           confdir=str(tmp_path / "conf"))
            log._ensure_started()
            odd = _flow()
            odd.request.timestamp_start = None  # not an OSError: flow_fields raises TypeError
            assert log.response(odd) is None
            assert odd.response.status_code == 503  # never sent as a 200 without its entry
            assert log.unavailable == "TypeError"
            _assert_closed(log)
            log.tick()
            assert log.unavailable is None
            log.done()
        return odd.id

    odd_id = asyncio.run(scenario())
    entries = _entries(tmp_path / "records")
    assert odd_id not in {e.get("flow_id") for e in entries}
    [resumed] = [e for e in entries if e["kind"] == "audit_resumed"]
    assert resumed["reason"] == "TypeError" and resumed["refused_requests"] == 2


def test_an_unreadable_or_vanishing_rules_file_is_recorded_and_the_tick_goes_on(setup, monkeypatch):
    from pathlib import Path

    tmp_path, rules = setup
    log = AuditLog()
    with taddons.context(log) as tctx:
        tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                       confdir=str(tmp_path / "conf"))
        log._ensure_started()
        (rules / "notes.txt").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO)
        (rules / "gone.yaml").write_text("x: 1\n")
        real_read = Path.read_bytes

        def read_bytes(path):  # another process removes gone.yaml between our listing and our read
            if path.name == "gone.yaml":
                path.unlink()
            return real_read(path)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        log._next_rules_check = 0
        log.tick()
        monkeypatch.setattr(Path, "read_bytes", real_read)
        assert log.unavailable is None
        log.writer._last_checkpoint = 0  # an interval checkpoint is due: the tick still writes it
        log.writer.append("event", {})
        log.tick()
        log.done()
    entries = _entries(tmp_path / "records")
    [changed] = [e for e in entries if e["kind"] == "config" and e["reason"] == "changed"]
    assert "gone.yaml" not in changed["files"] and "upstreams.yaml" in changed["files"]
    assert changed["unreadable"] == {"notes.txt": "OSError: Input/output error"}
    assert [e["reason"] for e in entries if e["kind"] == "checkpoint"][-2] == "interval"


def test_the_tick_task_outlives_an_error_and_reports_it(setup, caplog):
    import logging

    tmp_path, rules = setup

    async def scenario():
        log = AuditLog()
        with taddons.context(log) as tctx:
            tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                           confdir=str(tmp_path / "conf"))
            calls = []

            def tick():
                calls.append(time.monotonic())
                if len(calls) == 1:
                    raise RuntimeError("a bug in the tick")

            log.tick = tick
            monkeypatched = asyncio.get_running_loop().create_task(log._tick_forever())
            await asyncio.sleep(2.3)
            monkeypatched.cancel()
            assert len(calls) == 2
            del log.tick
            log.done()

    with caplog.at_level(logging.ERROR, logger="auditgate.addons.audit_log"):
        asyncio.run(scenario())
    assert "periodic tick failed: RuntimeError" in caplog.text


def test_a_key_file_that_cannot_be_replaced_closes_the_gateway_until_it_can(setup):
    tmp_path, rules = setup
    log = AuditLog()
    with taddons.context(log) as tctx:
        tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                       confdir=str(tmp_path / "conf"))
        log._ensure_started()
        key_path = tmp_path / "conf" / "audit-signing-key.pem"
        (tmp_path / "old.pem").write_bytes((tmp_path / "records" / "audit" / "public-key.pem").read_bytes())
        new_key = create_private_key_file(key_path.with_name(key_path.name + ".next"))
        saved = key_path.read_bytes()
        key_path.unlink()
        key_path.mkdir()  # the key's place is taken: the new key cannot be moved there
        (key_path / "keep").write_text("")
        log.tick()
        assert log.unavailable and "IsADirectoryError" in log.unavailable
        _assert_closed(log)
        log.tick()  # still in the way: stays closed, and does not rotate a second time
        assert log.unavailable
        (key_path / "keep").unlink()
        key_path.rmdir()
        key_path.write_bytes(saved)
        log.tick()
        assert log.unavailable is None
        assert key_id(load_private_key_file(key_path).public_key()) == key_id(new_key.public_key())
        log.done()
    entries = _entries(tmp_path / "records")
    assert [e["kind"] for e in entries].count("key_rotation") == 1
    assert verify(tmp_path / "records", [tmp_path / "old.pem"], check_flows=False).status == "verified"


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


def test_with_fsync_entry_the_intent_is_on_disk_before_the_request_goes_upstream(setup, monkeypatch):
    tmp_path, rules = setup
    disk = _HeldFsync(monkeypatch)

    async def scenario():
        log = AuditLog()
        with taddons.context(log) as tctx:
            tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                           confdir=str(tmp_path / "conf"), gateway_audit_fsync="entry", gateway_instance="gw-a")
            log.running()
            disk.hold(log.writer.path)
            flow = _flow()
            flow.response = None
            log.requestheaders(flow)
            waiter = log.request(flow)  # the last request hook: mitmproxy sends the request once it returns
            assert asyncio.iscoroutine(waiter)
            hook = asyncio.ensure_future(waiter)
            assert await asyncio.to_thread(disk.entered.wait, 10), "the request hook never asked for an fsync"
            assert not hook.done()  # the disk has not answered: the request is held
            [intent] = [e for e in _entries(tmp_path / "records") if e["kind"] == "intent"]
            assert intent["flow_id"] == flow.id and flow.metadata["auditgate.intent_seq"] == intent["seq"]
            assert intent["instance"] == "gw-a" == flow.metadata["auditgate.instance"]
            disk.release.set()
            await asyncio.wait_for(hook, 10)
            assert flow.response is None  # not refused: it goes upstream now
            disk.armed = False
            log.done()

    asyncio.run(scenario())


def test_a_request_whose_intent_cannot_be_written_is_refused_not_forwarded(setup):
    tmp_path, rules = setup

    async def scenario():
        recorder, log = FlowRecorder(), AuditLog()
        with taddons.context(recorder, log) as tctx:
            _configure(tctx, recorder, log, tmp_path, rules)
            log.running()
            fd = log.writer._fd
            saved, full = os.dup(fd), os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)  # every write to the audit file fails with ENOSPC
            try:
                flow = _flow()
                flow.response = None
                log.request(flow)
                assert flow.response.status_code == 503 and "auditgate.intent_seq" not in flow.metadata
            finally:
                os.dup2(saved, fd)
                os.close(saved)
                os.close(full)
            recorder.done()  # the bundle's order: the recorder's last records first, then the log closes
            log.done()

    asyncio.run(scenario())


def test_a_checkpoint_names_the_first_flow_entry_whose_record_is_still_on_its_way(setup):
    # The flow recorder writes a flow's record a moment after its entry (batched, by another process): a crash
    # just after a checkpoint loses such records, and the checkpoint says from which entry on that may be.
    from mitmproxy.addons.proxyserver import Proxyserver

    tmp_path, rules = setup

    async def scenario():
        recorder, log = FlowRecorder(), AuditLog()
        with taddons.context(Proxyserver(), recorder, log) as tctx:
            _configure(tctx, recorder, log, tmp_path, rules, gateway_audit_checkpoint_entries=1)
            recorder.running()
            log.running()
            flows = [_flow() for _ in range(3)]
            for flow in flows:  # no loop turn in between: every record still waits to be written
                recorder.response(flow)
                log.response(flow)
            entries = _entries(tmp_path / "records")
            seq_of = {e["flow_id"]: e["seq"] for e in entries if e["kind"] == "flow"}
            # With a checkpoint after each entry: the first names the flow entry that brought it; the later ones
            # still the first flow's, whose record is on its way as much as the others'.
            after_flows = [e for e in entries if e["kind"] == "checkpoint" and e["seq"] > seq_of[flows[0].id]]
            assert [c.get("records_pending_from") for c in after_flows] == [seq_of[flows[0].id]] * 3
            recorder._write_out()
            assert recorder._writer.flush(10)  # every record in its file now
            assert "records_pending_from" not in log.writer.checkpoint("interval")
            recorder.done()  # the bundle's order: the recorder's last records first, then the log closes
            log.done()

    asyncio.run(scenario())
    assert verify(tmp_path / "records").status == "verified"
