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
    assert figures["status_codes"] == {"200": 4, "401": 1, "403": 1} and figures["models"] == {"(none)": 6}


def test_the_period_selects_days(tmp_path):
    records = _write_log(tmp_path)
    result = verify(records, check_flows=False)
    day1 = build_evidence(result, "2025-11-24", "2025-11-24")["figures"]
    day2 = build_evidence(result, "2025-11-25", "2025-11-25")["figures"]
    assert day1["flows"] == 5 and day2["flows"] == 1
    assert day2["masked_entities_by_type"] == {"EMAIL_ADDRESS": 5}
    assert day2["config_in_force"]  # the configuration recorded before the period still applies


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


# ---- the tables an auditor reads: who, what, when, and where in the log ---------------------------------------------

T0 = DAY1 + 3600


def _write_rich_log(records, instance=None, start=T0):
    """A log holding every kind the pack tabulates: flows, approvals and refused attempts, config changes with
    per-rule digests, WebSocket events and an intent that never got its outcome."""
    now = [start]
    key = create_private_key_file(records.parent / f"{records.name}-key.pem")
    writer = AuditWriter(records / "audit", key, clock=lambda: now[0])
    tag = {"instance": instance} if instance else {}
    approval_id = f"ap-{instance or 1}"
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key()), **tag})
    writer.append("config", {"reason": "start", "files": {"policy.yaml": "1" * 64, "masking.yaml": "2" * 64},
                             "rule_digests": {"policy.yaml": {"block-secrets": "x", "hold-exports": "y"}}, **tag})
    intent = writer.append("intent", {"flow_id": "f-alice-200", "identity": {"name": "alice"}, "method": "POST",
                                      "host": "api.openai.com", "port": 443, "path": "/v1/responses", **tag})
    writer.append("flow", {**_flow("alice", policy={"rule": "hold-exports", "action": "require_approval"}),
                           "method": "POST", "path": "/v1/responses", "model": "gpt-test", "intent": intent["seq"],
                           **tag})
    writer.append("approval", {"flow_id": "fa", "requester": "alice", "approver": None, "decision": "requested",
                               "reason": None, "details": {"approval_id": approval_id, "rule": "hold-exports"}, **tag})
    now[0] += 30
    writer.append("approval", {"flow_id": "fa", "requester": "alice", "approver": "alice",
                               "decision": "refused_approved", "reason": "the requester cannot approve their own request",
                               "details": {"approval_id": approval_id, "rule": "hold-exports",
                                           "code": "self_approval_refused"}, **tag})
    writer.append("approval", {"flow_id": "fa", "requester": "alice", "approver": "bob", "decision": "approved",
                               "reason": "checked", "details": {"approval_id": approval_id, "rule": "hold-exports"}, **tag})
    now[0] += 30
    writer.append("config", {"reason": "changed", "files": {"policy.yaml": "3" * 64, "masking.yaml": "2" * 64},
                             "rule_digests": {"policy.yaml": {"block-secrets": "x", "hold-exports": "z",
                                                              "new-rule": "w"}}, **tag})
    writer.append("websocket_event", {"flow_id": "ws1", "event_type": "response.create",
                                      "policy": {"rule": "block-secrets", "action": "block"}, "blocked": True, **tag})
    writer.append("websocket_response", {"flow_id": "ws1", "response_id": "r1", "status": "completed",
                                         "masking": {"status": "masked", "findings": {"EMAIL_ADDRESS": 1}},
                                         "messages": 4, **tag})
    writer.append("websocket_session", {"flow_id": "ws1", "path": "/v1/realtime", "caller": "alice",
                                        "messages_from_client": 3, "messages_from_server": 5, "blocked": 1,
                                        "masked": 2, "close_code": 1000, "flow_file": None, **tag})
    writer.append("intent", {"flow_id": "lost-1", "identity": {"name": "bob"}, "method": "POST",
                             "host": "api.openai.com", "port": 443, "path": "/v1/chat/completions", **tag})
    writer.append("gateway_stop", tag)
    writer.close()
    return records


def test_tables_name_who_what_when_and_the_entries(tmp_path):
    records = _write_rich_log(tmp_path / "records")
    pack = build_evidence(verify(records, check_flows=False))
    tables, figures = pack["tables"], pack["figures"]
    [approval] = tables["approvals"]
    assert approval["requester"] == "alice" and approval["approver"] == "bob" and approval["decision"] == "approved"
    assert approval["requested_at"] == "2025-11-24T17:00:00Z" and approval["decided_at"] == "2025-11-24T17:00:30Z"
    [attempt] = tables["refused_decision_attempts"]
    assert (attempt["who"], attempt["attempted"], attempt["requester"], attempt["code"]) == (
        "alice", "approve", "alice", "self_approval_refused")
    assert "own request" in attempt["why"] and attempt["entry"] == "records#6"
    changes = {(c["file"], c["old"], c["new"], c["rules_changed"]) for c in tables["config_changes"]}
    assert ("policy.yaml", "sha256:1111111111111111…", "sha256:3333333333333333…", "hold-exports, new-rule") in changes
    assert not any(c["file"] == "masking.yaml" and c["old"] != "(first record)" for c in tables["config_changes"])
    [called] = tables["who_called_what"]
    assert (called["caller"], called["endpoint"], called["model"], called["entries"]) == (
        "alice", "POST /v1/responses", "gpt-test", ["records#4"])
    assert tables["decisions_by_rule"] == [{"rule": "hold-exports", "action": "require_approval", "requests": 1,
                                            "entries": ["records#4"]}]
    ws = figures["websocket"]
    assert (ws["sessions"], ws["messages_from_client"], ws["messages_from_server"], ws["blocked"], ws["masked"]) == (
        1, 3, 5, 1, 2)
    assert (ws["events_blocked"], ws["responses_masked"]) == (1, 1)
    assert [r["flow_id"] for r in tables["outcome_unknown"]] == ["lost-1"] and figures["forwarded_outcome_unknown"] == 1


def test_every_figure_in_the_reports_names_its_sequence_numbers_and_never_none(tmp_path):
    records = _write_rich_log(tmp_path / "records")
    write_evidence_pack(records, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    for text in (html, md):
        assert "None" not in text and "{" not in text.split("<style>")[-1].split("</style>")[-1].replace("{", "", 0)
    body = html.split("</style>")[1]
    assert "{" not in body and "None" not in body
    assert "seq 6" in html  # the refused attempt, by its sequence number
    assert "sha256:1111111111111111… → sha256:3333333333333333…" in html
    assert "| alice | approve | alice |" in md
