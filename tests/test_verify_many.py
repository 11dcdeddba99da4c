"""`auditgate verify DIR...` and `auditgate evidence DIR...` over several instances' records in one run."""

from __future__ import annotations

import json

from auditgate.audit.chain import (
    AuditWriter,
    audit_files,
    create_private_key_file,
    public_key_record,
)
from auditgate.audit.evidence import build_evidence
from auditgate.audit.verify import verify
from auditgate.cli import main as auditgate

DAY = 1_764_000_000


def _instance_log(records, instance, flows, approvals=(), start=DAY):
    now = [start]
    key = create_private_key_file(records.parent / f"{records.name}.pem")
    writer = AuditWriter(records / "audit", key, clock=lambda: now[0])
    tag = {"instance": instance} if instance else {}
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key()), **tag})
    for caller, path in flows:
        now[0] += 1
        writer.append("flow", {"flow_id": f"{instance}-{now[0]}", "identity": {"name": caller}, "method": "POST",
                               "path": path, "model": "gpt-test", "status": 200, "flow_file": None, **tag})
    for approval in approvals:
        now[0] += 1
        writer.append("approval", {**approval, **tag})
    writer.append("gateway_stop", tag)
    writer.close()
    return records


def _run(capsys, *args):
    code = auditgate([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_verify_reports_each_instance_and_exits_with_the_worst(tmp_path, capsys):
    a = _instance_log(tmp_path / "gw-a", "gw-a:8080", [("alice", "/v1/responses")])
    b = _instance_log(tmp_path / "gw-b", None, [("bob", "/v1/chat/completions")])  # a log without instance fields
    code, out, err = _run(capsys, "verify", "--skip-flows", a, b)
    assert code == 0 and "2 instances, exit code 0" in out
    assert "gw-a:8080: VERIFIED" in out and "gw-b: VERIFIED" in out  # the directory's name when entries have none
    assert err.count("no witness given") == 2

    [log] = audit_files(b / "audit")
    lines = log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"bob"', b'"eve"')  # an edited caller: that instance fails, the other stays
    log.write_bytes(b"".join(lines))
    code, out, _ = _run(capsys, "verify", "--skip-flows", a, b, tmp_path / "missing")
    assert code == 1 and "gw-a:8080: VERIFIED (exit code 0)" in out and "gw-b: FAILED (exit code 1)" in out
    assert "missing: UNREADABLE (exit code 2)" in out

    code, out, _ = _run(capsys, "verify", "--skip-flows", "--json", a, b)
    report = json.loads(out)
    assert code == 1 and report["exit_code"] == 1
    assert [(i["instance"], i["status"]) for i in report["instances"]] == [("gw-a:8080", "verified"), ("gw-b", "failed")]


def test_an_incomplete_instance_makes_the_run_incomplete_but_a_missing_one_outranks_it(tmp_path, capsys):
    a = _instance_log(tmp_path / "gw-a", "gw-a", [("alice", "/v1/responses")])
    b = _instance_log(tmp_path / "gw-b", "gw-b", [("bob", "/v1/responses")])
    with open(audit_files(b / "audit")[-1], "ab") as log:
        log.write(b'{"partial')  # a crash cut in the newest file: incomplete, not tampered
    assert _run(capsys, "verify", "--skip-flows", a, b)[0] == 3
    assert _run(capsys, "verify", "--skip-flows", a, b, tmp_path / "nowhere")[0] == 2


def test_one_pack_over_instances_names_who_called_what_through_which_and_approvals_across_them(tmp_path, capsys):
    held = {"flow_id": "f1", "requester": "alice", "approver": None, "decision": "requested", "reason": None,
            "details": {"approval_id": "ap-x", "rule": "hold-exports"}}
    decided = {"flow_id": "f1", "requester": "alice", "approver": "bob", "decision": "approved", "reason": "ok",
               "details": {"approval_id": "ap-x", "rule": "hold-exports"}}
    a = _instance_log(tmp_path / "gw-a", "gw-a:8080", [("alice", "/v1/responses")] * 2, [held])
    b = _instance_log(tmp_path / "gw-b", "gw-b:8080", [("alice", "/v1/responses"), ("bob", "/v1/embeddings")],
                      [decided], start=DAY + 60)
    pack = build_evidence([verify(a, check_flows=False), verify(b, check_flows=False)])
    rows = {(r["caller"], r["instance"], r["endpoint"]): (r["requests"], r["entries"])
            for r in pack["tables"]["who_called_what"]}
    assert rows == {("alice", "gw-a:8080", "POST /v1/responses"): (2, ["gw-a:8080#2", "gw-a:8080#3"]),
                    ("alice", "gw-b:8080", "POST /v1/responses"): (1, ["gw-b:8080#2"]),
                    ("bob", "gw-b:8080", "POST /v1/embeddings"): (1, ["gw-b:8080#3"])}
    [approval] = pack["tables"]["approvals"]  # held on one instance, decided on the other
    assert (approval["requested_on"], approval["decided_on"], approval["approver"]) == ("gw-a:8080", "gw-b:8080", "bob")
    assert approval["entries"] == ["gw-a:8080#4", "gw-b:8080#4"]

    code, out, _ = _run(capsys, "evidence", a, b, "--out", tmp_path / "out")
    assert code == 0 and "over 2 records directories" in out
    html = (tmp_path / "out" / "report.html").read_text()
    assert "gw-a:8080: 2–3" in html and "gw-b:8080: 2" in html
    written = json.loads((tmp_path / "out" / "evidence.json").read_text())
    assert [i["instance"] for i in written["verification"]["instances"]] == ["gw-a:8080", "gw-b:8080"]
