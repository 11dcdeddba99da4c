"""Configuration changes by rule id through a real mitmdump: policy.yaml edited while the gateway runs (one rule
added, one changed), and `auditgate evidence` names both rule ids in its HTML table; the pack's own "check it
yourself" commands then run as shown against these records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser

import openai
import pytest
import yaml

from tests.conftest import gateway_env
from tests.gateway_process import BIN, GatewayProcess
from tests.test_audit_evidence import run_self_check

pytestmark = pytest.mark.e2e

MARKER = "zebra-evidence-marker"
NEW_RULE = "block-evidence-marker"


def _entries(records):
    return [json.loads(line) for path in sorted((records / "audit").glob("audit-*.jsonl"))
            for line in path.read_bytes().splitlines() if line.endswith(b"}")]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _Tables(HTMLParser):
    """The cell texts of every table row, by table id (what a browser shows, without one)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = dict(attrs).get("id")
            self.rows[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.rows[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _blocked(client) -> str | None:
    try:
        client.responses.create(model="gpt-test", input=f"please repeat {MARKER}")
    except openai.APIStatusError as e:
        return e.body.get("code") if isinstance(e.body, dict) else None
    return None


def test_a_policy_edited_while_running_shows_the_rule_ids_added_and_changed_in_the_evidence_html(
        tmp_path, rules_and_callers, confdir, upstream, upstream_server):
    shipped_rules, callers = rules_and_callers
    rules, records = tmp_path / "rules", tmp_path / "records"
    shutil.copytree(shipped_rules, rules)  # the session's rules stay as they are
    gateway = GatewayProcess(tmp_path / "gw", rules=rules, records=records, confdir=confdir, env=gateway_env(),
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}"]).start()
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=callers.alice, max_retries=0, timeout=10)
        assert _blocked(client) is None  # served: no rule knows the marker yet
        start = _wait_for(lambda: [e for e in _entries(records) if e["kind"] == "config"], 10, "the start config")
        policy = yaml.safe_load((rules / "policy.yaml").read_text())
        changed_rule = policy["rules"][0]
        assert start[0]["rule_digests"]["policy.yaml"][changed_rule["id"]]  # recorded per rule from the start
        changed_rule["message"] = "edited while the gateway runs"
        policy["rules"].insert(1, {"id": NEW_RULE, "match": {"text": {"keywords": [MARKER]}}, "action": "block",
                                   "message": "the evidence marker"})
        # The editor's save: the whole file rewritten (comments and layout gone), swapped in at once.
        (tmp_path / "policy.yaml.new").write_text(yaml.safe_dump(policy, sort_keys=False, allow_unicode=True))
        os.replace(tmp_path / "policy.yaml.new", rules / "policy.yaml")

        _wait_for(lambda: [e for e in _entries(records) if e["kind"] == "config" and e["reason"] == "changed"
                           and NEW_RULE in e.get("rule_digests", {}).get("policy.yaml", {})], 15,
                  "the config entry of the edit")
        assert _wait_for(lambda: _blocked(client), 15, "the new rule in force") == "gateway_blocked"
    finally:
        gateway.stop()

    out = tmp_path / "pack"
    done = subprocess.run([str(BIN / "auditgate"), "evidence", str(records), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "verifier: VERIFIED" in done.stdout, done.stdout + done.stderr
    tables = _Tables()
    tables.feed((out / "report.html").read_text())
    headers = ["when (UTC)", "instance", "file", "old → new digest", "rule ids changed", "recorded because",
               "audit entry"]
    rows = [dict(zip(headers, row)) for row in tables.rows["config-changes-table"]]
    edits = [r for r in rows if r["file"] == "policy.yaml" and r["recorded because"] == "changed"]
    assert [r["rule ids changed"] for r in edits] == [f"added: {NEW_RULE}; changed: {changed_rule['id']}"], rows
    old, _, new = edits[0]["old → new digest"].partition(" → ")
    assert old.startswith("sha256:") and new.startswith("sha256:") and old != new
    assert edits[0]["audit entry"].startswith("seq ")
    # Nothing else changed: no other file has a row beyond its first record.
    assert all(r["old → new digest"].startswith("(first record)") for r in rows if r not in edits)

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    (tmp_path / "auditor").mkdir()
    hash_output, signature_output = run_self_check(out, tmp_path / "auditor")
    assert hash_output.split()[0] == "True" and "Signature Verified Successfully" in signature_output
