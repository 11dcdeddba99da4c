"""The evidence pack's figures, period filter and rendering, from a log written by the gateway's own writer."""

from __future__ import annotations

import hashlib
import json

import pytest
import rfc8785
import yaml

from auditgate.audit.chain import (
    AuditWriter,
    create_private_key_file,
    load_private_key_file,
    public_key_pem,
    public_key_record,
)
from auditgate.audit.entries import read_rules_state, rule_list_digests
from auditgate.audit.evidence import (
    build_evidence,
    render_html,
    render_markdown,
    write_evidence_pack,
)
from auditgate.audit.verify import verify
from auditgate.core.config import ConfigError
from auditgate.core.shipped import SHIPPED_RULES

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
    assert ("policy.yaml", "sha256:1111111111111111…", "sha256:3333333333333333…",
            "added: new-rule; changed: hold-exports") in changes
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


# ---- configuration changes by rule id ----------------------------------------------------------------------------

def _shipped_policy() -> str:
    return (SHIPPED_RULES / "policy.yaml").read_text()


def test_each_rule_of_policy_yaml_gets_the_digest_of_its_canonical_json_and_only_edited_rules_change():
    text = _shipped_policy()
    rules, settings = rule_list_digests(text.encode())
    document = yaml.safe_load(text)
    ids = [r["id"] for r in document["rules"]]
    assert list(rules) == ids and set(settings) == set(document) - {"rules"}
    # What an auditor recomputes with a YAML reader and a standard JCS implementation:
    first = document["rules"][0]
    assert rules[first["id"]] == hashlib.sha256(rfc8785.dumps(first)).hexdigest()

    edited = yaml.safe_load(text)
    edited["rules"][1]["message"] = "another message"
    edited["rules"].insert(0, {"id": "new-rule", "match": {"text": {"keywords": ["x"]}}, "action": "block"})
    # Re-dumped: every comment gone and the layout changed; the rules not edited keep their digests.
    after, _ = rule_list_digests(yaml.safe_dump(edited, sort_keys=True).encode())
    assert sorted(r for r in set(after) | set(rules) if after.get(r) != rules.get(r)) == sorted(["new-rule", ids[1]])

    with_float, _ = rule_list_digests(b"rules:\n  - {id: a, action: require_approval, timeout_seconds: 0.5}\n")
    assert with_float["a"] == hashlib.sha256(rfc8785.dumps(
        {"id": "a", "action": "require_approval", "timeout_seconds": "0.5"})).hexdigest()
    with pytest.raises(ConfigError):
        rule_list_digests(b"rules: [unclosed")


def test_a_policy_no_rule_digest_can_be_taken_of_is_named_and_the_config_entry_still_written(tmp_path):
    (tmp_path / "policy.yaml").write_text('rules:\n  - {id: a, message: "\\ud800"}\n')  # a lone surrogate
    state = read_rules_state(tmp_path)
    assert "policy.yaml" in state.digests and "policy.yaml" not in state.rule_digests
    assert state.unparsed["policy.yaml"] == "its rules cannot be digested: CanonicalJsonError"
    key = create_private_key_file(tmp_path / "k.pem")
    writer = AuditWriter(tmp_path / "records" / "audit", key)
    writer.append("config", state.config_fields("changed", tmp_path), sanitized=True)  # JCS-sealed like any entry
    writer.close()


def _config_log(records, policies: list[str | None]):
    """A log whose config entries are what the gateway writes for each policy.yaml text in turn (None: removed)."""
    now = [T0]
    key = create_private_key_file(records.parent / f"{records.name}-key.pem")
    writer = AuditWriter(records / "audit", key, clock=lambda: now[0])
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key())})
    rules_dir = records.parent / f"{records.name}-rules"
    rules_dir.mkdir()
    (rules_dir / "masking.yaml").write_text("entities: []\n")
    for n, text in enumerate(policies):
        if text is None:
            (rules_dir / "policy.yaml").unlink()
        else:
            (rules_dir / "policy.yaml").write_text(text)
        writer.append("config", read_rules_state(rules_dir).config_fields("start" if n == 0 else "changed", rules_dir),
                      sanitized=True)
        now[0] += 10
    writer.append("gateway_stop", {})
    writer.close()
    return records


def test_config_changes_name_the_rules_added_removed_changed_and_reordered(tmp_path):
    base = "default: allow\nrules:\n  - {id: a, action: block, match: {model: x}}\n  - {id: b, action: log, match: {model: y}}\n"
    edited = "default: allow\nrules:\n  - {id: b, action: log, match: {model: z}}\n  - {id: c, action: allow, match: {}}\n"
    reordered = "default: allow\nrules:\n  - {id: c, action: allow, match: {}}\n  - {id: b, action: log, match: {model: z}}\n"
    setting = "default: block\nrules:\n  - {id: c, action: allow, match: {}}\n  - {id: b, action: log, match: {model: z}}\n"
    comment = "# only a comment\n" + setting
    records = _config_log(tmp_path / "records", [base, edited, reordered, setting, comment, "rules: [", setting, None,
                                                            "rules: [", None])
    rows = [r for r in build_evidence(verify(records, check_flows=False))["tables"]["config_changes"]
            if r["file"] == "policy.yaml"]
    assert [r["rules_changed"] for r in rows] == [
        "first record: 2 rule(s)",
        "added: c; removed: a; changed: b",
        "order of the rules changed",
        "settings changed: default",
        "none (layout or comments only)",
        "not readable as rules (line 1: invalid YAML: expected the node content, but found '<stream end>'); "
        "the gateway keeps the rules it had",
        "2 rule(s) now; the rules before were not recorded",
        "file removed (its rules: b, c)",
        "not readable as rules (line 1: invalid YAML: expected the node content, but found '<stream end>'); "
        "the gateway keeps the rules it had",
        "file removed",
    ]
    assert rows[1]["rules_added"] == ["c"] and rows[1]["rules_removed"] == ["a"] and rows[1]["rules_modified"] == ["b"]
    assert rows[7]["new"] == rows[9]["new"] == "(removed)"
    # masking.yaml holds no rule list: nothing to say about rule ids, and nothing "not recorded" either.
    [masking] = [r for r in build_evidence(verify(records, check_flows=False))["tables"]["config_changes"]
                 if r["file"] == "masking.yaml"]
    assert masking["rules_changed"] == "—"


def test_config_entries_of_an_older_gateway_say_rules_not_recorded(tmp_path):
    records = _write_log(tmp_path)  # config entries without rule_digests
    key = create_private_key_file(tmp_path / "k2.pem")
    writer = AuditWriter(records / "audit", key, clock=lambda: DAY2 + 60)
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key())})
    writer.append("config", {"reason": "start", "files": {"upstreams.yaml": "a" * 64, "policy.yaml": "b" * 64}})
    writer.close()
    rows = build_evidence(verify(records, check_flows=False))["tables"]["config_changes"]
    assert {r["file"]: r["rules_changed"] for r in rows if r["old"] != "(first record)"} == {"policy.yaml": "not recorded"}


# ---- what an auditor reads never says None ---------------------------------------------------------------------

def test_an_intent_without_method_host_or_path_is_reported_without_none(tmp_path):
    now = [T0]
    key = create_private_key_file(tmp_path / "k.pem")
    writer = AuditWriter(tmp_path / "records" / "audit", key, clock=lambda: now[0])
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key())})
    writer.append("intent", {"flow_id": "bare"})
    writer.append("intent", {"flow_id": None, "method": "POST", "host": None, "path": "/v1/responses"})
    writer.append("intent", {"method": {"raw": "dict"}, "host": "api.openai.com", "port": 443})
    writer.append("flow", {**_flow("alice"), "flow_id": None, "intent": 99})
    writer.close()
    result = verify(tmp_path / "records", check_flows=False)
    messages = [f.message for f in result.findings if f.kind == "outcome unknown"]
    assert messages == [
        "flow bare (request not recorded): forwarded, outcome unknown (gateway stopped): its intent has no outcome entry",
        "flow (no flow id) (POST /v1/responses): forwarded, outcome unknown (gateway stopped): its intent has no "
        "outcome entry",
        "flow (no flow id) (api.openai.com): forwarded, outcome unknown (gateway stopped): its intent has no outcome "
        "entry",
    ]
    summary = result.summary()
    assert "None" not in summary and "{" not in summary, summary
    write_evidence_pack(tmp_path / "records", tmp_path / "out")
    for name in ("report.html", "report.md"):
        body = (tmp_path / "out" / name).read_text().split("</style>")[-1]
        assert "None" not in body and "{" not in body and "'raw'" not in body


# ---- the auditor's own check, as the pack words it -------------------------------------------------------------

def run_self_check(pack_dir, cwd) -> list[str]:
    """Runs, in bash, the commands the HTML pack shows under "How to check these records yourself", as shown
    (read back from the HTML, unescaped); returns their outputs. `python3` is this venv's (it has rfc8785)."""
    import html as html_module
    import os
    import re
    import subprocess
    import sys

    page = (pack_dir / "report.html").read_text()
    section = page.split('<section id="self-check">', 1)[1].split("</section>", 1)[0]
    commands = [html_module.unescape(c) for c in re.findall(r"<pre><code>(.*?)</code></pre>", section, re.S)]
    assert len(commands) == 2, section
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}")
    outputs = []
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60, env=env)
        outputs.append(done.stdout + done.stderr)
    return outputs


def test_the_pack_shows_how_to_check_one_hash_and_one_signature_with_standard_tools(tmp_path):
    import shutil

    records = _write_rich_log(tmp_path / "records")
    signing_key = load_private_key_file(records.parent / "records-key.pem")
    (records / "audit" / "public-key.pem").write_bytes(public_key_pem(signing_key.public_key()))  # as the gateway does
    write_evidence_pack(records, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## How to check these records yourself" in md and "openssl pkeyutl -verify" in md and "rfc8785" in md
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    (tmp_path / "work").mkdir()
    hash_output, signature_output = run_self_check(tmp_path / "out", tmp_path / "work")
    ok, digest = hash_output.split()
    assert ok == "True" and "Signature Verified Successfully" in signature_output
    assert f"auditgate-audit-checkpoint:v1:13:{digest} " in (tmp_path / "out" / "report.html").read_text()  # signed

    # The commands check something: an edited entry no longer matches its hash.
    audit_file = next((records / "audit").glob("audit-*.jsonl"))
    lines = audit_file.read_bytes().splitlines()
    signed = json.loads(lines[-2])
    assert json.loads(lines[-1])["signed_seq"] == signed["seq"] and signed["kind"] == "gateway_stop"
    lines[-2] = lines[-2].replace(b'"kind":"gateway_stop"', b'"kind":"gateway_start"')
    audit_file.write_bytes(b"\n".join(lines) + b"\n")
    assert run_self_check(tmp_path / "out", tmp_path / "work")[0].split()[0] == "False"


def test_a_log_without_a_format_2_checkpoint_says_where_the_recipe_is(tmp_path):
    records = tmp_path / "records"
    key = create_private_key_file(tmp_path / "k.pem")
    writer = AuditWriter(records / "audit", key, clock=lambda: T0)
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key())})
    writer.append("flow", _flow("alice"))  # no checkpoint: the writer signs at close
    pack = build_evidence(verify(records, check_flows=False))
    assert pack["self_check"] is None
    assert "auditors&#x27; guide" in render_html(pack) and "auditors' guide" in render_markdown(pack)
