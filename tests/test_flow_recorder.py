"""The flow recorder in isolation (mitmproxy's own test harness, no network): scrubbing and rotation."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from mitmproxy import io
from mitmproxy.test import taddons, tflow

from addons.flow_recorder import FlowRecorder
from auditgate.recording.writer import MIN_RESTART_SECONDS


def _read(path):
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def _flow(body: bytes = b"hello"):
    flow = tflow.tflow(resp=True)
    flow.request.headers["authorization"] = "Bearer agt_secret"
    flow.request.headers["x-api-key"] = "sk-secret"
    flow.request.headers["x-kept"] = "yes"
    flow.metadata["proxyauth"] = ("user", "password")
    flow.metadata["auditgate.identity"] = {"name": "alice"}
    flow.response.content = body
    return flow


def test_records_scrub_credentials(tmp_path):
    async def scenario():
        recorder = FlowRecorder()
        with taddons.context(recorder) as tctx:
            tctx.configure(recorder, gateway_records=str(tmp_path))
            recorder.response(_flow())
            await asyncio.sleep(0)  # one turn: the record is taken on the next (or at done, below)
            recorder.done()

    asyncio.run(scenario())
    [path] = (tmp_path / "flows").glob("*.mitm")
    [flow] = _read(path)
    assert "authorization" not in flow.request.headers and "x-api-key" not in flow.request.headers
    assert flow.request.headers["x-kept"] == "yes"
    assert "proxyauth" not in flow.metadata and flow.metadata["auditgate.identity"] == {"name": "alice"}
    assert b"secret" not in path.read_bytes() and b"password" not in path.read_bytes()


def test_not_live_flows_are_not_recorded(tmp_path):
    recorder = FlowRecorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, gateway_records=str(tmp_path))
        flow = _flow()
        flow.live = False
        recorder.response(flow)
        recorder.done()
    assert list((tmp_path / "flows").glob("*.mitm")) == []


def test_rotation_by_size_and_by_day(tmp_path, monkeypatch):
    now = [datetime(2026, 11, 25, 23, 59, tzinfo=timezone.utc)]
    monkeypatch.setattr(FlowRecorder, "_now", staticmethod(lambda: now[0]))
    recorder = FlowRecorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, gateway_records=str(tmp_path), gateway_flows_max_mb=1)
        for _ in range(3):  # 600 KB each: the third finds the file past 1 MB and starts a new one
            recorder.record(_flow(b"x" * 600_000))
            recorder._drain()
        now[0] += timedelta(minutes=2)  # a new UTC day
        recorder.record(_flow())
        recorder._drain()
        recorder.done()
    files = sorted((tmp_path / "flows").glob("*.mitm"))
    assert [len(_read(p)) for p in files] == [2, 1, 1]
    assert files[-1].name.startswith("flows-20261126T")
    assert [f.metadata["auditgate.flow_file"] for p in files for f in _read(p)] == [p.name for p in files for _ in _read(p)]


def test_the_writer_process_is_outside_the_gateways_group_and_is_restarted_if_killed(tmp_path):
    import os
    import signal
    import time

    recorder = FlowRecorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, gateway_records=str(tmp_path))
        recorder.record(_flow(b"first"))
        recorder._write_out()
        child = recorder._writer._process
        # A Ctrl-C to the gateway's process group must not reach it while it still holds flows.
        assert os.getpgid(child.pid) != os.getpgid(0)
        assert recorder._writer.flush(10)  # written and answered
        os.kill(child.pid, signal.SIGKILL)
        child.wait(5)
        time.sleep(MIN_RESTART_SECONDS)
        recorder.record(_flow(b"second"))
        recorder._write_out()  # the pipe is broken: a new writer is started and takes the batch, whole
        assert recorder._writer.flush(10)
        assert recorder._writer.pid not in (None, child.pid)
        assert not recorder.failing  # the new writer answered: recording works again
        recorder.done()
    [path] = (tmp_path / "flows").glob("*.mitm")
    assert [f.response.content for f in _read(path)] == [b"first", b"second"]


def test_a_write_the_disk_refuses_is_answered_flow_by_flow_and_what_was_written_stays_readable(tmp_path):
    from auditgate.recording.writer import FlowFileWriter, flow_record

    good = tmp_path / "good.mitm"
    outcomes = []
    writer = FlowFileWriter(outcomes.append)
    kept, lost, after = _flow(b"kept"), _flow(b"lost"), _flow(b"after")
    try:
        writer.submit([(str(good), kept.id, flow_record(kept))])
        writer.submit([("/dev/full", lost.id, flow_record(lost))])  # every write fails: ENOSPC
        writer.submit([(str(good), after.id, flow_record(after))])
        assert writer.flush(10)
    finally:
        writer.close()
    # (A flow that cannot be encoded never reaches the writer: test_a_flow_that_cannot_be_encoded_is_lost_alone...)
    assert [o.error for o in outcomes] == [None, "OSError: No space left on device", None]
    assert [[(l.flow_id, l.flow_file) for l in o.lost] for o in outcomes] == [[], [(lost.id, "full")], []]
    assert all(o.answered for o in outcomes)
    assert [f.response.content for f in _read(good)] == [b"kept", b"after"]


def test_a_stopped_writer_never_blocks_the_loop_and_its_queue_refuses_new_requests(tmp_path):
    import os
    import signal
    import time

    async def scenario():
        recorder = FlowRecorder()
        with taddons.context(recorder) as tctx:
            tctx.configure(recorder, gateway_records=str(tmp_path), gateway_flows_queue_mb=1)
            recorder._writer.start()
            child = recorder._writer.pid
            os.kill(child, signal.SIGSTOP)
            try:
                slowest = 0.0
                for _ in range(8):  # 300 KB each: the 64 KiB pipe is full at once, the rest waits in the queue
                    started = time.monotonic()
                    recorder.response(_flow(b"x" * 300_000))
                    recorder._write_out()
                    slowest = max(slowest, time.monotonic() - started)
                assert slowest < 0.1  # a blocking pipe write would hang here for as long as the writer is stopped
                assert recorder._writer.queued_bytes > 1024 * 1024 and "queue" in recorder.failing
                new = _flow()
                new.response = None
                recorder.request(new)
                assert new.response.status_code == 503
                assert new.metadata["auditgate.refusal"]["code"] == "gateway_records_unavailable"
                admitted = _flow(b"the upstream's reply")
                recorder.response(admitted)  # admitted before: its reply is withheld, not sent unrecorded
                assert admitted.response.status_code == 503
            finally:
                os.kill(child, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while recorder.failing and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the loop writes the queue as the pipe drains
                recorder.check_health()
            assert not recorder.failing
            later = _flow()
            later.response = None
            recorder.request(later)
            assert later.response is None
            recorder.done()

    asyncio.run(scenario())
    flows = [f for p in (tmp_path / "flows").glob("*.mitm") for f in _read(p)]
    assert len(flows) == 9 and flows[-1].response.status_code == 503


def test_lost_records_are_reported_in_the_audit_log_and_verified_as_reported(tmp_path):
    import time

    from addons.audit_log import AuditLog
    from auditgate.audit.verify import verify

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "upstreams.yaml").write_text("upstreams: []\n")

    async def scenario():
        recorder, log = FlowRecorder(), AuditLog()
        with taddons.context(recorder, log) as tctx:
            tctx.configure(recorder, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules))
            tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                           confdir=str(tmp_path / "conf"))
            tctx.master.options.add_option("store_streamed_bodies", bool, False, "mitmproxy's own, not in the harness")
            log.running()
            recorder.running()
            # The file the recorder writes next cannot take a byte (as on a full disk).
            recorder._current_path().symlink_to("/dev/full")
            served = _flow(b"served, record lost")
            recorder.response(served)
            log.response(served)
            deadline = time.monotonic() + 10
            while not recorder.failing and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert "No space left on device" in recorder.failing["disk"]
            refused = _flow()
            refused.response = None
            recorder.request(refused)
            assert refused.response.status_code == 503
            recorder.response(refused)
            log.response(refused)
            # The probe finds the directory writable: the recorder moves to a new file and serves again.
            while recorder.failing and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not recorder.failing
            after = _flow(b"after")
            recorder.response(after)
            log.response(after)
            recorder.done()
            log.done()
        return served.id

    lost_id = asyncio.run(scenario())
    result = verify(tmp_path / "records")
    assert result.status == "incomplete", result.summary()
    # The file that was a device is named, not read; the flow meant for it is a loss the gateway reported.
    assert sorted(f.kind for f in result.findings) == ["not a flow file", "record lost (reported)"], result.summary()
    [reported] = [f for f in result.findings if f.kind == "record lost (reported)"]
    assert lost_id in reported.message and result.flows_lost_reported == 1


def test_flow_record_is_byte_for_byte_mitmproxys_flow_writer_and_leaves_the_flow_alone():
    import io as std_io

    from auditgate.recording.writer import flow_record

    flow = _flow(b"body \xff")
    flow.metadata["auditgate.identity"] = {"subject": "alice", "groups": ["agents"], "n": 1, "x": None, "b": b"\x00"}
    flow.metadata["other"] = [{"a": 1.5, "t": True}, ("tuple", 2), "é漢"]
    before = flow.get_state()
    buffer = std_io.BytesIO()
    io.FlowWriter(buffer).add(flow)  # mitmproxy's own writer: get_state, then its tnetstring
    assert flow_record(flow) == buffer.getvalue()
    assert flow.get_state() == before and flow.metadata["other"][1] == ("tuple", 2)


def test_flows_on_kept_alive_connections_reuse_their_encoding_and_still_write_mitmproxys_bytes():
    import io as std_io

    from auditgate.recording import writer

    def mitmproxys(flow):
        buffer = std_io.BytesIO()
        io.FlowWriter(buffer).add(flow)
        return buffer.getvalue()

    first, second = _flow(b"one"), _flow(b"two")
    second.client_conn, second.server_conn = first.client_conn, first.server_conn  # one kept-alive connection pair
    assert writer.flow_record(first) == mitmproxys(first)
    client = writer._encoded_connection(first.client_conn)
    assert writer.flow_record(second) == mitmproxys(second)
    assert writer._encoded_connection(second.client_conn) is client  # encoded once, reused
    # A change of the connection, even one == cannot see (a port as a float, a start time that is 1.0 vs 1),
    # gives its own bytes: mitmproxy's.
    for change in ({"timestamp_end": 2.0}, {"tls_version": "TLSv1.3"}, {"timestamp_start": 1}, {"timestamp_start": 1.0},
                   {"alpn": b"h2"}, {"sockname": ("127.0.0.1", 8080.0)}, {"error": "closed"}):
        for name, value in change.items():
            setattr(second.client_conn, name, value)
            setattr(second.server_conn, name, value)
        assert writer.flow_record(second) == mitmproxys(second), change
        assert writer.flow_record(first) == mitmproxys(first), change
    # A flow with a backup (compared with its state): its connections are taken as they are.
    second.backup()
    second.comment = "changed after its backup"
    assert writer.flow_record(second) == mitmproxys(second)


def test_a_flow_that_cannot_be_encoded_is_lost_alone_and_reported(tmp_path):
    recorder = FlowRecorder()
    reported = []
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, gateway_records=str(tmp_path))
        recorder._take_lost = reported.extend
        before, odd, after = _flow(b"before"), _flow(b"odd"), _flow(b"after")
        odd.metadata["odd"] = {1, 2}  # no tnetstring: mitmproxy could not write it either
        for flow in (before, odd, after):
            recorder.record(flow)
        recorder._write_out()
        assert recorder._writer.flush(10)
        assert not recorder.failing  # one odd flow is no failing disk
        recorder.done()
    assert [(r.flow_id, "cannot be encoded" in r.reason) for r in reported] == [(odd.id, True)]
    [path] = (tmp_path / "flows").glob("*.mitm")
    assert [f.response.content for f in _read(path)] == [b"before", b"after"]


def test_a_record_is_on_its_way_until_its_file_has_it_or_its_loss_is_reported(tmp_path):
    # The audit log's checkpoints name the first flow entry whose record is still on its way (a crash would
    # lose it): this is what they ask.
    from mitmproxy.addons.proxyserver import Proxyserver

    from auditgate.core.flow_contract import services

    async def scenario():
        recorder = FlowRecorder()
        with taddons.context(Proxyserver(), recorder) as tctx:  # the proxy server declares store_streamed_bodies
            tctx.configure(recorder, gateway_records=str(tmp_path))
            recorder.running()
            assert services.flow_records is recorder
            kept, odd = _flow(b"kept"), _flow(b"odd")
            odd.metadata["odd"] = {1, 2}  # cannot be encoded: lost (and reported) when its turn comes
            assert not recorder.unsettled(kept.id)
            recorder.record(kept)
            recorder.record(odd)
            assert recorder.unsettled(kept.id) and recorder.unsettled(odd.id)
            recorder._write_out()
            assert recorder.unsettled(kept.id) and not recorder.unsettled(odd.id)  # handed over; lost and reported
            assert recorder._writer.flush(10)  # the writer's answer: in its file now
            assert not recorder.unsettled(kept.id)
            recorder.done()
            assert services.flow_records is None

    asyncio.run(scenario())
    [path] = (tmp_path / "flows").glob("*.mitm")
    assert [f.response.content for f in _read(path)] == [b"kept"]
