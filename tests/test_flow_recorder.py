"""The flow recorder in isolation (mitmproxy's own test harness, no network): scrubbing and rotation."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from mitmproxy import io
from mitmproxy.test import taddons, tflow

from addons.flow_recorder import FlowRecorder


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
            await asyncio.sleep(0)  # the write runs on the loop's next turn
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
        recorder._drain()
        recorder._flush()
        child = recorder._writer._process
        # A Ctrl-C to the gateway's process group must not reach it while it still holds flows.
        assert os.getpgid(child.pid) != os.getpgid(0)
        deadline = time.monotonic() + 10
        while not any(p.stat().st_size for p in (tmp_path / "flows").glob("*.mitm")) and time.monotonic() < deadline:
            time.sleep(0.02)  # the writer has written the first flow
        os.kill(child.pid, signal.SIGKILL)
        child.wait(5)
        recorder.record(_flow(b"second"))
        recorder._drain()
        recorder._flush()  # the pipe is broken: a new writer is started and takes the batch
        assert recorder._writer._process is not child
        recorder.done()
    [path] = (tmp_path / "flows").glob("*.mitm")
    assert [f.response.content for f in _read(path)] == [b"first", b"second"]


def test_a_write_the_disk_refuses_is_reported_and_what_was_written_stays_readable(tmp_path, caplog):
    import logging
    import time

    from auditgate.recording.writer import FlowFileWriter

    good = tmp_path / "good.mitm"
    writer = FlowFileWriter()
    try:
        writer.write([(str(good), _flow(b"kept").get_state())])
        writer.write([("/dev/full", _flow(b"lost").get_state())])  # every write fails: ENOSPC
        writer.write([(str(good), _flow(b"after").get_state())])
        deadline = time.monotonic() + 10
        with caplog.at_level(logging.ERROR, logger="auditgate.recording.writer"):
            while "could not record" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
                writer.report_errors()
    finally:
        writer.close()
    assert "could not record 1 flow(s) to /dev/full" in caplog.text
    assert [f.response.content for f in _read(good)] == [b"kept", b"after"]


def test_flow_state_equals_mitmproxys_own_and_is_a_copy():
    from auditgate.recording.writer import flow_state

    flow = _flow(b"body")
    flow.metadata["auditgate.identity"] = {"subject": "alice", "groups": ["agents"], "n": 1, "x": None, "b": b"\x00"}
    flow.metadata["other"] = [{"a": 1.5, "t": True}, ("tuple", 2)]
    state = flow_state(flow)
    assert state == flow.get_state()
    state["metadata"]["auditgate.identity"]["groups"].append("admins")  # the record is a copy
    state["metadata"]["other"][1] = None
    assert flow.metadata["auditgate.identity"]["groups"] == ["agents"]
    assert flow.metadata["other"][1] == ("tuple", 2)
    assert flow.metadata is not state["metadata"] and flow.get_state()["metadata"] == flow.metadata
