"""The verifier on what the gateway reported lost, and on records built to exhaust it (deep nesting)."""

from __future__ import annotations

import json
import subprocess
import time

from mitmproxy import io
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from auditgate.audit.chain import (
    AuditWriter,
    create_private_key_file,
    load_private_key_file,
    public_key_record,
)
from auditgate.audit.entries import flow_fields, record_fields
from auditgate.audit.flow_files import MAX_DEPTH, parse_tnetstring
from auditgate.audit.verify import verify
from auditgate.core.flow_contract import FLOW_FILE
from auditgate.core.refusal import refuse
from tests.audit_logs import build_log, rewrite_line
from tests.gateway_process import BIN, ROOT


def _read(path):
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def _write(path, flows) -> None:
    with open(path, "wb") as f:
        writer = io.FlowWriter(f)
        for flow in flows:
            writer.add(flow)


def _drop_record(log, index: int = 2):
    """Remove one flow's record from its flow file (as a full disk, or someone, would): its id and file."""
    [path, *_] = sorted((log.records / "flows").glob("*.mitm"))
    flows = _read(path)
    gone = flows.pop(index)
    _write(path, flows)
    return gone.id, path.name


def _report(log, kind: str, fields: dict) -> None:
    """An entry appended by the gateway's own writer with its key (a later run), as the gateway reports."""
    writer = AuditWriter(log.audit_dir, load_private_key_file(log.key))
    writer.append(kind, fields)
    writer.close()


def test_a_record_removed_without_a_report_is_tampering(tmp_path):
    log = build_log(tmp_path, runs=1)
    flow_id, _ = _drop_record(log)
    result = verify(log.records, [log.pubkey])
    assert result.status == "failed"
    [finding] = result.findings
    assert finding.kind == "flow missing" and flow_id in finding.message


def test_a_loss_the_gateway_reported_is_told_apart_from_tampering(tmp_path):
    log = build_log(tmp_path, runs=1)
    flow_id, name = _drop_record(log)
    _report(log, "records_lost", {"reason": "OSError: No space left on device", "count": 1,
                                  "flows": [{"flow_id": flow_id, "flow_file": name}]})
    result = verify(log.records, [log.pubkey])
    assert result.status == "incomplete", result.summary()
    [finding] = result.findings
    assert finding.kind == "record lost (reported)" and finding.severity == "incomplete"
    assert "reported the loss itself" in finding.message and "No space left on device" in finding.message
    assert result.flows_lost_reported == 1
    cli = subprocess.run([str(BIN / "python"), "-m", "auditgate", "verify", str(log.records), "--pubkey",
                          str(log.pubkey)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 3 and "reported lost by the gateway" in cli.stdout and "FAILED" not in cli.stdout


def test_a_report_cannot_be_slipped_in_afterwards(tmp_path):
    log = build_log(tmp_path, runs=1)
    flow_id, name = _drop_record(log)
    _report(log, "records_lost", {"reason": "disk", "count": 1, "flows": [{"flow_id": "another", "flow_file": name}]})
    [*_, last] = log.files()
    index = next(i for i, line in enumerate(log.lines(last)) if b"records_lost" in line)
    rewrite_line(last, index, lambda e: e["flows"][0].update(flow_id=flow_id))  # edited to cover the removal
    result = verify(log.records, [log.pubkey])
    assert result.status == "failed"
    assert "modified" in {f.kind for f in result.findings}


def test_a_lost_record_of_a_refused_flow_is_a_note(tmp_path):
    records = tmp_path / "records"
    key = create_private_key_file(tmp_path / "keys" / "audit-signing-key.pem")
    writer = AuditWriter(records / "audit", key)
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key())})
    flow = tflow.tflow(resp=True)
    refuse(flow, 503, "gateway_records_unavailable", "the gateway cannot record requests right now")
    FLOW_FILE.set(flow, "flows-x.mitm")
    writer.append("flow", flow_fields(flow, time.time()))
    writer.append("records_lost", {"reason": "OSError: No space left on device", "count": 1,
                                   "flows": [{"flow_id": flow.id, "flow_file": "flows-x.mitm"}]})
    writer.close()
    (records / "flows").mkdir()
    (records / "flows" / "flows-x.mitm").write_bytes(b"")
    result = verify(records)
    # Nothing was served: the lost record of a refusal is worth a note, the log verifies.
    assert result.status == "verified", result.summary()
    [finding] = result.findings
    assert (finding.severity, finding.kind) == ("note", "record lost (reported)")


def _deep_list(depth: int) -> bytes:
    """A tnetstring list nested `depth` deep, built without recursion (and without quadratic copying)."""
    lengths = [3]  # b"0:]"
    for _ in range(depth - 1):
        inner = lengths[-1]
        lengths.append(len(str(inner)) + 1 + inner + 1)
    prefix = b"".join(f"{n}:".encode() for n in reversed(lengths[:-1]))
    return prefix + b"0:]" + b"]" * (depth - 1)


def _with_extra(state: dict, key: str, raw: bytes) -> bytes:
    """The flow's record as mitmproxy writes it, with one more top-level member given as raw tnetstring."""
    body = b"".join(tnetstring.dumps(k.encode() if isinstance(k, str) else k) + tnetstring.dumps(v)
                    for k, v in state.items())
    body += tnetstring.dumps(key.encode()) + raw
    return f"{len(body)}:".encode() + body + b"}"


def test_a_record_nested_deeper_than_the_limit_is_a_finding_not_a_crash(tmp_path):
    deep = _deep_list(200_000)
    assert parse_tnetstring(_deep_list(MAX_DEPTH)) is not None  # within the limit: read as usual
    log = build_log(tmp_path, runs=1)
    [path] = sorted((log.records / "flows").glob("*.mitm"))
    flows = _read(path)
    data = b"".join(tnetstring.dumps(f.get_state()) for f in flows[1:])
    path.write_bytes(_with_extra(flows[0].get_state(), "deep", deep) + data)
    result = verify(log.records, [log.pubkey])
    # The record's own fields are still read: its digests match its entry; the part too deep is named.
    assert result.flows_matched == result.flow_entries
    [finding] = result.findings
    assert finding.kind == "nested too deep" and finding.severity == "incomplete"
    cli = subprocess.run([str(BIN / "python"), "-m", "auditgate", "verify", str(log.records)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 3 and "nested too deep" in cli.stdout and "RecursionError" not in cli.stderr


def test_an_audit_line_nested_too_deep_is_unreadable_not_a_crash(tmp_path):
    log = build_log(tmp_path, runs=1)
    [audit_file] = log.files()
    lines = log.lines(audit_file)
    entry = json.loads(lines[3])
    lines[3] = json.dumps(entry)[:-1].encode() + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    audit_file.write_bytes(b"".join(lines))
    result = verify(log.records, [log.pubkey])
    assert result.status == "failed"
    assert "unreadable" in {f.kind for f in result.findings}
    assert any("nested deeper" in f.message for f in result.findings)


def _crashed_run(tmp_path, recorded: int, pending_from_index: int | None, removed: int | None = None):
    """A run that stops without shutting down (kill -9) right after a checkpoint: six flow entries, of which only
    the first `recorded` flow records reached their file; the checkpoint after the sixth names the entry of flow
    `pending_from_index` as the first whose record was still on its way (None: it names none)."""
    records = tmp_path / "records"
    key = create_private_key_file(tmp_path / "key.pem")
    entries: dict[int, int] = {}  # flow index -> its entry's seq

    def pending_from():
        return entries.get(pending_from_index) if pending_from_index is not None else None

    writer = AuditWriter(records / "audit", key, pending_records_from=pending_from)
    writer.append("gateway_start", {"pid": 1, "signing_key": public_key_record(key.public_key())})
    (records / "flows").mkdir(parents=True)
    flows = []
    for i in range(6):
        flow = tflow.tflow(resp=True)
        flow.request.content = f"request {i}".encode()
        FLOW_FILE.set(flow, "flows-crashed.mitm")
        entries[i] = writer.append("flow", flow_fields(flow, time.time()))["seq"]
        writer.append("record", record_fields(flow, entries[i]))  # its record taken (on its way to the file)
        flows.append(flow)
    checkpoint = writer.checkpoint("entries")
    entries[6] = writer.append("flow", flow_fields(flows[0], time.time()))["seq"]  # one more, never recorded either
    _write(records / "flows" / "flows-crashed.mitm", [f for i, f in enumerate(flows[:recorded]) if i != removed])
    return records, checkpoint, entries  # the writer is never closed: the process was killed


def test_records_a_crash_took_on_their_way_to_the_file_are_lost_in_the_crash_not_removed(tmp_path):
    records, checkpoint, entries = _crashed_run(tmp_path, recorded=3, pending_from_index=3)
    assert checkpoint["records_pending_from"] == entries[3]
    result = verify(records)
    assert not [f for f in result.findings if f.severity == "failed"], result.summary()
    lost = [f for f in result.findings if f.kind == "flow lost in crash"]
    assert sorted(f.seq for f in lost) == [entries[3], entries[4], entries[5], entries[6]]
    assert result.flows_matched == 3


def test_without_that_note_the_same_loss_is_taken_for_removed_records(tmp_path):
    # What the gateway wrote before it said which records were still on their way: the verifier cannot tell.
    records, checkpoint, entries = _crashed_run(tmp_path, recorded=3, pending_from_index=None)
    assert "records_pending_from" not in checkpoint
    result = verify(records)
    missing = [f for f in result.findings if f.kind == "flow missing" and f.severity == "failed"]
    assert sorted(f.seq for f in missing) == [entries[3], entries[4], entries[5]]


def test_a_record_removed_before_the_first_one_on_its_way_is_still_tampering(tmp_path):
    records, _, entries = _crashed_run(tmp_path, recorded=3, pending_from_index=3, removed=1)
    result = verify(records)
    [missing] = [f for f in result.findings if f.severity == "failed"]
    assert missing.kind == "flow missing" and missing.seq == entries[1]


def test_a_checkpoint_names_the_first_record_on_its_way_only_within_the_chain(tmp_path):
    key = create_private_key_file(tmp_path / "key.pem")
    answers = iter([None, 0, 99, "2", 2])
    writer = AuditWriter(tmp_path / "audit", key, pending_records_from=lambda: next(answers))
    for _ in range(3):
        writer.append("config", {"n": 1})
    checkpoints = [writer.checkpoint("interval") for _ in range(5)]
    # Nothing, zero, past the head, or not an integer: not said. Only a seq of the chain is.
    assert ["records_pending_from" in c for c in checkpoints] == [False, False, False, False, True]
    assert checkpoints[-1]["records_pending_from"] == 2


def test_a_record_whose_digest_a_crash_took_from_the_log_is_not_digested_not_tampering(tmp_path):
    """A power loss after the last checkpoint can keep a flow's record (the flow file was synced) and lose the end
    of the log that held its record entry: the record cannot be checked field by field, and verify says so
    (incomplete); outside that window the same gap is a failure."""
    records = tmp_path / "records"
    key = create_private_key_file(tmp_path / "key.pem")
    writer = AuditWriter(records / "audit", key)
    writer.append("gateway_start", {"pid": 1, "signing_key": public_key_record(key.public_key())})
    flow = tflow.tflow(resp=True)
    FLOW_FILE.set(flow, "flows-crashed.mitm")
    seq = writer.append("flow", flow_fields(flow, time.time()))["seq"]  # its record entry never reached the disk
    (records / "flows").mkdir(parents=True)
    _write(records / "flows" / "flows-crashed.mitm", [flow])
    result = verify(records)  # the writer is never closed: the process was killed
    assert not [f for f in result.findings if f.severity == "failed"], result.summary()
    [undigested] = [f for f in result.findings if f.kind == "record not digested"]
    assert undigested.seq == seq and undigested.severity == "incomplete" and flow.id in undigested.message
    writer.checkpoint("entries")  # the same gap, now covered by a signed checkpoint: not a crash's doing
    failed = [f for f in verify(records).findings if f.severity == "failed"]
    assert [(f.kind, f.seq) for f in failed] == [("flow modified", seq)] and "record entry" in failed[0].message
