"""The evidence pack's figures, period filter and rendering, from a log written by the gateway's own writer."""

from __future__ import annotations

import json

from auditgate.audit.chain import (
    AuditWriter,
    create_private_key_file,
    public_key_record,
)
from auditgate.audit.evidence import build_evidence, write_evidence_pack
from auditgate.audit.verify import verify

DAY1, DAY2 = 1_764_000_000, 1_764_000_000 + 86_400  # two consecutive UTC days


def _flow(name, refusal=None, masking=None, policy=None, status=200):
    return {"flow_id": f"f-{name}-{status}", "identity": {"name": name, "groups": ["agents"]} if name else None,
            "status": status, "refusal": refusal, "masking": masking, "policy": policy, "flow_file": None}


def _write_log(tmp_path):
    now = [DAY1]
    key = create_private_key_file(tmp_path / "k.pem")
    writer = AuditWriter(tmp_path / "records" / "audit", key, clock=lambda: now[0])
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key())})
    writer.append("config", {"reason": "start", "files": {"upstreams.yaml": "a" * 64}})
    masked = {"status": "masked", "findings": [{"entity_type": "EMAIL_ADDRESS", "count": 2, "path": "input",
                                                "direction": "request"},
                                               {"entity_type": "PHONE_NUMBER", "count": 1, "path": "output",
                                                "direction": "response"}]}
    for flow in (_flow("alice", masking=masked), _flow("alice", policy={"decision": "allow"}),
                 _flow("<script>bob</script>"), _flow(None, refusal={"code": "gateway_unauthenticated"}, status=401),
                 _flow("carol", refusal={"code": "gateway_forbidden"}, policy={"decision": "deny"}, status=403)):
        writer.append("flow", flow)
    writer.append("approval", {"flow_id": "f1", "requester": "alice", "approver": None, "decision": "requested"})
    writer.append("approval", {"flow_id": "f1", "requester": "alice", "approver": "alice",
                               "decision": "refused_approved"})  # the gateway refused a self-approval
    writer.append("approval", {"flow_id": "f1", "requester": "alice", "approver": "bob", "decision": "approved"})
    writer.append("approval", {"flow_id": "f2", "requester": "carol", "approver": "carol", "decision": "approved"})
    writer.append("approval", {"flow_id": "f3", "requester": "carol", "approver": "bob", "decision": "denied"})
    now[0] = DAY2
    writer.append("flow", _flow("alice", masking={"status": "masked", "findings": [
        {"entity_type": "EMAIL_ADDRESS", "count": 5, "path": "input", "direction": "request"}]}))
    writer.append("gateway_stop", {})
    writer.close()
    return tmp_path / "records"


def test_figures_count_what_the_log_holds(tmp_path):
    records = _write_log(tmp_path)
    result = verify(records, check_flows=False)
    assert result.status == "verified", result.summary()
    figures = build_evidence(result)["figures"]
    assert figures["requests_per_identity"] == {"(unauthenticated)": 1, "<script>bob</script>": 1, "alice": 3, "carol": 1}
    assert figures["refusals_by_reason"] == {"gateway_forbidden": 1, "gateway_unauthenticated": 1}
    assert figures["masked_entities_by_type"] == {"EMAIL_ADDRESS": 7, "PHONE_NUMBER": 1}
    assert figures["masked_entities_by_direction"] == {"request": 7, "response": 1}
    assert figures["approval_events"] == 5 and figures["approvals"] == 2
    assert figures["approvals_approver_differs"] == 1 and len(figures["approvals_approver_is_requester"]) == 1
    assert figures["approval_attempts_refused"] == 1
    assert figures["approval_outcomes"] == {"approved": 2, "denied": 1, "refused_approved": 1, "requested": 1}
    assert figures["policy_decisions"] == {"allow": 1, "deny": 1}
    assert figures["config_in_force"]["files"] == {"upstreams.yaml": "a" * 64}


def test_the_period_selects_days(tmp_path):
    records = _write_log(tmp_path)
    result = verify(records, check_flows=False)
    day1 = build_evidence(result, "2025-11-24", "2025-11-24")["figures"]
    day2 = build_evidence(result, "2025-11-25", "2025-11-25")["figures"]
    assert day1["flows"] == 5 and day2["flows"] == 1
    assert day2["masked_entities_by_type"] == {"EMAIL_ADDRESS": 5}
    assert day2["config_in_force"] is not None  # the configuration recorded before the period still applies


def test_the_reports_are_self_contained_and_escape_what_they_quote(tmp_path):
    records = _write_log(tmp_path)
    pack = write_evidence_pack(records, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;bob&lt;/script&gt;" in html
    assert html.count("<svg") == 1 and "<rect" in html
    assert json.loads((tmp_path / "out" / "evidence.json").read_text())["figures"] == json.loads(json.dumps(pack["figures"]))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "A.5.3 Segregation of duties (ISO/IEC 27001:2013: A.6.1.2)" in md
    assert "1 self-approval(s)" in md
