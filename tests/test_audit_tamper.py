"""Tampering with a real audit log: each change is detected, at the entry where it was made."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import pytest
from mitmproxy import io

from auditgate.audit.chain import (
    create_private_key_file,
    load_private_key_file,
    parse_entry_line,
    read_tail,
)
from auditgate.audit.verify import verify
from tests.audit_logs import (
    BuiltLog,
    build_log,
    rechain,
    rewrite_line,
    run_gateway_once,
)
from tests.gateway_process import ROOT


@pytest.fixture
def log(tmp_path) -> BuiltLog:
    return build_log(tmp_path)


def _failures(result):
    return [(f.kind, f.seq) for f in result.findings if f.severity == "failed"]


def _cli(log, *extra):
    return subprocess.run([sys.executable, "-m", "auditgate", "verify", str(log.records), "--pubkey",
                           str(log.pubkey), *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_an_untouched_log_verifies(log):
    result = verify(log.records, [log.pubkey])
    assert result.status == "verified", result.summary()
    assert result.findings == []
    assert len(log.files()) == 2 and result.signed_upto == result.last_seq
    assert result.flows_matched == 12
    done = _cli(log)
    assert done.returncode == 0 and "VERIFIED" in done.stdout


def test_an_edited_field_is_detected_at_that_entry(log):
    seq = log.seqs_of_kind("flow")[3]
    path, index = log.locate(seq)
    rewrite_line(path, index, lambda e: e.update(status=500))
    result = verify(log.records, [log.pubkey])
    assert _failures(result) == [("modified", seq)]
    done = _cli(log)
    assert done.returncode == 1 and f"seq {seq}" in done.stdout


def test_an_edit_with_the_chain_recomputed_is_caught_by_the_signatures(log):
    seq = log.seqs_of_kind("flow")[1]
    path, index = log.locate(seq)
    rewrite_line(path, index, lambda e: e.update(identity={"name": "mallory", "groups": [], "method": "service_token"}))
    rechain(log)  # every hash and prev consistent again; the attacker has no signing key
    result = verify(log.records, [log.pubkey])
    first_checkpoint_after = min(s for s in log.seqs_of_kind("checkpoint") if s > seq)
    assert result.status == "failed"
    assert result.first_break.kind == "forged" and result.first_break.seq == first_checkpoint_after


def test_a_replaced_entry_is_detected_at_that_entry(log):
    seq = log.seqs_of_kind("flow")[2]
    path, index = log.locate(seq)

    def replace(entry):
        entry["status"] = 403
        entry.pop("hash")
        from auditgate.audit.chain import entry_hash
        entry["hash"] = entry_hash(entry)  # re-hashed, but its successor still links to the original

    rewrite_line(path, index, replace)
    assert _failures(verify(log.records, [log.pubkey]))[0] == ("replaced", seq)


def test_a_deleted_entry_is_detected_where_it_is_missing(log):
    seq = log.seqs_of_kind("flow")[2]
    path, index = log.locate(seq)
    lines = log.lines(path)
    del lines[index]
    path.write_bytes(b"".join(lines))
    result = verify(log.records, [log.pubkey])
    assert ("deleted", seq + 1) in _failures(result)
    assert result.first_break.kind == "deleted" and f"seq {seq} missing" in result.first_break.message


def test_an_inserted_entry_is_detected_at_the_insertion(log):
    seq = log.seqs_of_kind("flow")[2]
    before = log.entry(seq - 1)
    path, index = log.locate(seq)
    forged = dict(log.entry(seq), flow_id="forged-flow", prev=before["hash"])
    forged.pop("hash")
    from auditgate.audit.chain import seal
    _, line = seal(forged)  # a well-formed entry that links to its predecessor
    lines = log.lines(path)
    lines.insert(index, line)
    path.write_bytes(b"".join(lines))
    result = verify(log.records, [log.pubkey])
    assert result.first_break.kind == "inserted" and result.first_break.seq == seq
    assert result.first_break.where == f"{path.name}:{index + 1} (seq {seq})"


def test_two_swapped_entries_are_detected_as_reordered(log):
    seq = log.seqs_of_kind("flow")[1]
    path, index = log.locate(seq)
    lines = log.lines(path)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    path.write_bytes(b"".join(lines))
    result = verify(log.records, [log.pubkey])
    assert result.first_break.kind == "reordered" and result.first_break.seq == seq + 1
    assert {kind for kind, _ in _failures(result)} == {"reordered"}


def test_a_file_cut_mid_line_is_reported_as_truncation(log):
    newest = log.files()[-1]
    data = newest.read_bytes()
    last_complete = data.rstrip(b"\n").rfind(b"\n") + 1
    newest.write_bytes(data[: last_complete + 25])  # the last entry is cut in the middle
    last_seq = json.loads(data[last_complete:])["seq"]
    result = verify(log.records, [log.pubkey])
    truncated = [f for f in result.findings if f.kind == "truncated"]
    assert truncated and truncated[0].seq == last_seq and "partial line of 25 bytes" in truncated[0].message
    assert result.status != "verified"
    assert _cli(log).returncode == 3


def test_an_older_file_cut_at_a_line_boundary_breaks_the_chain(log):
    older = log.files()[0]
    lines = log.lines(older)
    cut_seq = json.loads(lines[-2])["seq"]
    older.write_bytes(b"".join(lines[:-2]))
    result = verify(log.records, [log.pubkey])
    assert result.status == "failed"
    assert ("deleted", cut_seq + 2) in _failures(result)  # the next file's first entry no longer links
    assert any(kind == "truncated" for kind, _ in _failures(result))


def test_a_whole_file_replaced_by_a_forged_run_is_detected(log, tmp_path):
    # The attacker replaces the second run's file with one of their own, chained from the real first file
    # and signed with their own key.
    second = log.files()[1]
    first_seq = json.loads(log.lines(second)[0])["seq"]
    second.unlink()
    assert read_tail(log.audit_dir).seq == first_seq - 1
    mallory = create_private_key_file(tmp_path / "mallory.pem")
    run_gateway_once(log.records, mallory, 9, 2)
    result = verify(log.records, [log.pubkey])
    assert result.status == "failed"
    untrusted = [f for f in result.findings if f.kind == "untrusted key"]
    assert untrusted and untrusted[0].seq > first_seq
    assert any(f.kind == "unaudited flow" for f in result.findings)  # the real run's flows lost their entries


def test_a_forged_checkpoint_is_detected_at_that_checkpoint(log):
    seq = log.seqs_of_kind("checkpoint")[2]
    path, index = log.locate(seq)
    rewrite_line(path, index, lambda e: e.update(signature=base64.b64encode(b"\x01" * 64).decode()))
    rechain(log)
    result = verify(log.records, [log.pubkey])
    assert _failures(result)[0] == ("forged", seq)


def test_a_changed_flow_record_is_detected(log):
    flow_file = log.records / "flows" / "flows-run2.mitm"
    with open(flow_file, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    flows[1].response.content = b'{"output": "something else"}'
    with open(flow_file, "wb") as f:
        writer = io.FlowWriter(f)
        for flow in flows:
            writer.add(flow)
    result = verify(log.records, [log.pubkey])
    changed = [f for f in result.findings if f.kind == "flow modified"]
    assert len(changed) == 1 and flows[1].id in changed[0].message and "response" in changed[0].message


def test_a_log_signed_only_by_another_key_fails(log, tmp_path):
    other = tmp_path / "other.pem"
    from auditgate.audit.chain import public_key_pem
    other.write_bytes(public_key_pem(load_private_key_file(log.key).public_key()))
    assert verify(log.records, [other]).status == "verified"  # the same key, another copy: fine
    stranger = create_private_key_file(tmp_path / "stranger-key.pem")
    other.write_bytes(public_key_pem(stranger.public_key()))
    assert verify(log.records, [other]).status == "failed"


# ---- format 2: the whole flow record, field by field --------------------------------------------------------------

def _rewrite_flow(log, change, which: int = 1):
    """Edit one recorded flow as someone with write access to the flow files would (mitmproxy's own io)."""
    flow_file = log.records / "flows" / "flows-run2.mitm"
    with open(flow_file, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    change(flows[which])
    with open(flow_file, "wb") as f:
        writer = io.FlowWriter(f)
        for flow in flows:
            writer.add(flow)
    return flows[which].id


def _identity_to_mallory(flow):
    flow.metadata["auditgate.identity"] = {"name": "mallory", "groups": ["agents"], "method": "service_token"}


def _set_query(flow):
    flow.request.path = flow.request.path + "?debug=1"


def _set_path(flow):
    flow.request.path = "/v1/files"


def _add_header(flow):
    flow.response.headers["x-added"] = "1"


def _edit_request_header(flow):
    flow.request.headers["content-type"] = "text/plain"


def _status_418(flow):
    flow.response.status_code = 418


def _host(flow):
    flow.request.host = "elsewhere.example"


def _timestamp(flow):
    flow.response.timestamp_end += 3600


def _drop_masking(flow):
    flow.metadata.pop("auditgate.identity")


@pytest.mark.parametrize("change, field", [
    (_identity_to_mallory, "metadata.auditgate.identity"),
    (_set_query, "request.path"),
    (_set_path, "request.path"),
    (_add_header, "response.headers"),
    (_edit_request_header, "request.headers"),
    (_status_418, "response.status_code"),
    (_host, "request.host"),
    (_timestamp, "response.timestamps"),
    (_drop_masking, "metadata.keys"),
], ids=["identity", "query", "path", "response-header", "request-header", "status", "host", "timestamp",
        "metadata-removed"])
def test_an_edited_flow_record_fails_verify_naming_the_field(log, change, field):
    flow_id = _rewrite_flow(log, change)
    result = verify(log.records, [log.pubkey])
    [changed] = [f for f in result.findings if f.severity == "failed"]
    assert changed.kind == "flow modified" and flow_id in changed.message
    assert field in changed.message and "from its audit entry" in changed.message, changed.message
    done = _cli(log)
    assert done.returncode == 1 and field in done.stdout


def _rewritten_by_the_gateway(log, change) -> None:
    """Rewrite a built log entry by entry as the gateway would have written it: change(entry) returns the entry
    to write (changed in place or not) or None to leave it out; each entry is then re-chained and re-hashed
    over its format's canonical JSON and each checkpoint re-signed, as only the signing key can. Built here
    rather than kept as records in the repository."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from auditgate.audit.chain import checkpoint_message, seal, sign_b64

    key = load_pem_private_key(log.key.read_bytes(), None)
    head, seq = "0" * 64, 0
    moved: dict[int, int] = {}  # an entry's seq before → after: the seqs entries name follow
    for path in log.files():
        lines = []
        for line in log.lines(path):
            entry = parse_entry_line(line)
            was = entry["seq"]
            entry = change(entry)
            if entry is None:
                continue
            for name in ("flow", "intent"):
                if type(entry.get(name)) is int:
                    entry[name] = moved[entry[name]]
            moved[was] = seq + 1
            entry.pop("hash", None)
            if entry["kind"] == "checkpoint":
                entry["signed_seq"], entry["signed_hash"] = seq, head
                entry["signature"] = sign_b64(key, checkpoint_message(seq, head))
            seq += 1
            entry["seq"], entry["prev"] = seq, head
            sealed, data = seal(entry)
            head = sealed["hash"]
            lines.append(data)
        first = parse_entry_line(lines[0])["seq"]
        path.unlink()
        (path.parent / re.sub(r"audit-\d+-", f"audit-{first:012d}-", path.name)).write_bytes(b"".join(lines))


def _downgrade_to_format_1(log) -> None:
    """The log as format 1 wrote it: no "v", no instance, no whole-flow claims, no intents."""

    def format_1(entry):
        if entry["kind"] in ("intent", "record"):
            return None
        for name in ("v", "instance", "record", "intent", "intent_seq", "stream_cut"):
            entry.pop(name, None)
        return entry

    _rewritten_by_the_gateway(log, format_1)


def _downgrade_to_format_2(log) -> None:
    """The log as format 2 wrote it: each flow's whole-flow digest in its flow entry, no record entries."""
    records = {}
    for path in log.files():
        for line in log.lines(path):
            entry = parse_entry_line(line)
            if entry["kind"] == "record":
                records[entry["flow"]] = entry["record"]

    def format_2(entry):
        if entry["kind"] == "record":
            return None
        if entry["kind"] == "flow":
            entry["record"] = records[entry["seq"]]
        entry["v"] = 2
        return entry

    _rewritten_by_the_gateway(log, format_2)


def test_a_format_1_log_still_verifies(log):
    _downgrade_to_format_1(log)
    records, pubkey = log.records, log.pubkey
    result = verify(records, [pubkey])
    assert result.status == "verified", result.summary()
    assert result.format_versions == [1] and result.flows_matched == 12
    # Format 1's checks still bite: a body changed in a format 1 record is found.
    flow_file = records / "flows" / "flows-run1.mitm"
    with open(flow_file, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    flows[0].response.content = b"changed"
    with open(flow_file, "wb") as f:
        writer = io.FlowWriter(f)
        for flow in flows:
            writer.add(flow)
    changed = [f for f in verify(records, [pubkey]).findings if f.kind == "flow modified"]
    assert len(changed) == 1 and "response body" in changed[0].message


@pytest.mark.parametrize("version", [1, 2], ids=["format-1", "format-2"])
def test_an_older_format_entry_slipped_into_a_newer_log_is_a_downgrade(log, version):
    from auditgate.audit.chain import seal
    seq = log.seqs_of_kind("flow")[2]
    path, index = log.locate(seq)

    def downgrade(entry):
        entry.pop("v")
        if version != 1:
            entry["v"] = version
        entry.pop("hash")
        entry["hash"] = seal(entry)[0]["hash"]  # a valid hash of that format

    rewrite_line(path, index, downgrade)
    assert ("downgraded", seq) in _failures(verify(log.records, [log.pubkey]))


# ---- format 3: the whole-flow digest in a record entry of its own ---------------------------------------------

def test_a_format_2_log_still_verifies_field_by_field(log):
    _downgrade_to_format_2(log)
    result = verify(log.records, [log.pubkey])
    assert result.status == "verified", result.summary()
    assert result.format_versions == [2] and result.flows_matched == 12 and log.seqs_of_kind("record") == []
    # Format 2's whole-flow digest still bites: a status changed in a format 2 record is named.
    flow_id = _rewrite_flow(log, _status_418)
    [changed] = [f for f in verify(log.records, [log.pubkey]).findings if f.severity == "failed"]
    assert changed.kind == "flow modified" and flow_id in changed.message and "response.status_code" in changed.message


def _without_the_record_entry_of(log, index: int) -> tuple[str, int]:
    """The log as a gateway would have written it had it not written one flow's record entry: (its flow id,
    the seq of its flow entry in the rewritten log)."""
    record = log.entry(log.seqs_of_kind("record")[index])
    _rewritten_by_the_gateway(log, lambda e: None if e["kind"] == "record" and e["flow"] == record["flow"] else e)
    [seq] = [s for s in log.seqs_of_kind("flow") if log.entry(s)["flow_id"] == record["flow_id"]]
    return record["flow_id"], seq


def test_a_flow_whose_record_entry_is_missing_fails_verify(log):
    flow_id, seq = _without_the_record_entry_of(log, 2)
    result = verify(log.records, [log.pubkey])
    assert _failures(result) == [("flow modified", seq)], result.summary()
    assert flow_id in result.first_break.message and "record entry" in result.first_break.message
    assert result.flows_matched == 11


def test_a_missing_record_entry_the_log_owned_up_to_is_a_known_gap(log):
    """The audit log failed as the recorder took the record (the reply had gone out): it closes, and names the
    flow among those served unaudited when it resumes. Not tampering, but that record is not checked."""
    flow_id, seq = _without_the_record_entry_of(log, 2)

    def own_up(entry):
        if entry["kind"] == "gateway_stop" and entry["pid"] == 1:
            return {**entry, "kind": "audit_resumed", "unaudited_flows": [flow_id], "refused_requests": 0,
                    "unavailable_since": entry["time"], "reason": "No space left on device"}
        return entry

    _rewritten_by_the_gateway(log, own_up)
    result = verify(log.records, [log.pubkey])
    assert [(f.severity, f.kind) for f in result.findings] == [("incomplete", "record not digested")], result.summary()
    assert flow_id in result.findings[0].message and result.status == "incomplete"


def _client_left(flow):
    from mitmproxy import flow as mflow
    flow.error = mflow.Error("client disconnected")


def test_an_error_added_to_a_format_3_record_fails_verify(log):
    """Format 2 let a record differ from its entry by an error alone (mitmproxy notes a client that left during
    the response hook after the entry was written); a format 3 record entry is taken with the record, so there
    an added error is an edit like any other."""
    flow_id = _rewrite_flow(log, _client_left)
    [changed] = [f for f in verify(log.records, [log.pubkey]).findings if f.severity == "failed"]
    assert changed.kind == "flow modified" and flow_id in changed.message and "error" in changed.message


def _owning_up(flow_id: str, field: str):
    """The gateway's own account of an outage naming one flow in `field` (unaudited_flows, withheld_flows)."""
    def own_up(entry):
        if entry["kind"] == "gateway_stop" and entry["pid"] == 1:
            return {**entry, "kind": "audit_resumed", "unaudited_flows": [], "refused_requests": 0,
                    "unavailable_since": entry["time"], "reason": "No space left on device", field: [flow_id]}
        return entry
    return own_up


def test_an_edited_record_of_a_withheld_reply_fails_verify(log):
    """A flow listed as withheld still has its record entry in format 3: an edit to its record is tampering,
    not the note "reply withheld"."""
    flow_id = _rewrite_flow(log, _status_418, which=1)
    _rewritten_by_the_gateway(log, _owning_up(flow_id, "withheld_flows"))
    [changed] = [f for f in verify(log.records, [log.pubkey]).findings if f.severity == "failed"]
    assert changed.kind == "flow modified" and "response.status_code" in changed.message


def test_an_undigested_record_is_still_checked_on_its_bodies(log):
    """Where the log owned up to a missing record entry, the flow entry's body digests still decide."""
    flow_id, seq = _without_the_record_entry_of(log, 8)  # a flow of run 2, the file _rewrite_flow edits
    _rewritten_by_the_gateway(log, _owning_up(flow_id, "unaudited_flows"))
    assert [f.kind for f in verify(log.records, [log.pubkey]).findings] == ["record not digested"]
    which = next(i for i, f in enumerate(_read_flows(log)) if f.id == flow_id)
    _rewrite_flow(log, lambda f: setattr(f.response, "content", b"changed"), which=which)
    [changed] = [f for f in verify(log.records, [log.pubkey]).findings if f.severity == "failed"]
    assert changed.kind == "flow modified" and flow_id in changed.message and "response body" in changed.message


def _read_flows(log):
    with open(log.records / "flows" / "flows-run2.mitm", "rb") as f:
        return list(io.FlowReader(f).stream())


def test_a_second_record_entry_for_one_flow_is_a_bad_reference(log):
    record_seq = log.seqs_of_kind("record")[3]
    copy = {k: v for k, v in log.entry(record_seq).items() if k not in ("seq", "prev", "hash")}

    def twice(entry):
        return dict(copy, kind="record") if entry["kind"] == "gateway_stop" and entry["pid"] == 1 else entry

    _rewritten_by_the_gateway(log, twice)
    result = verify(log.records, [log.pubkey])
    assert [f.kind for f in result.findings if f.severity == "failed"] == ["bad record reference"], result.summary()
