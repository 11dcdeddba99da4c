"""End to end, through a real mitmdump running the bundle under a umask of 022, the real openai SDK, HTTP calls
to the admin API and a local OIDC issuer: who sees which held request, four-eyes on stable subjects (issuer +
sub, token id) rather than display names, and the approvals database's file modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml

from auditgate.identity.service_tokens import add_service_token, token_hash
from tests.approval_gateway import AdminClient, add_test_rules, admin_url
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import ROOT, GatewayProcess
from tests.oidc_issuer import LocalIssuer
from tests.records import wait_for_flows

pytestmark = pytest.mark.e2e

# A rule that another group decides: bob (approvers) may not see what it holds, carol (security) may.
SECURITY_RULE = """
  - id: approve-by-security
    match: {text: {keywords: [security-approval-marker]}}
    action: require_approval
    approvers: [security]
    timeout_seconds: 30
"""


class GatewayUnderUmask022(GatewayProcess):
    """The gateway started through a shell that sets the umask to 022 first (then execs mitmdump: same pid)."""

    def command(self) -> list[str]:
        return ["/bin/sh", "-c", 'umask 022 && exec "$@"', "umask-022", *super().command()]


@dataclass
class Setup:
    gateway: GatewayProcess
    admin: str
    issuer: LocalIssuer
    tokens: dict[str, str]  # service tokens: alice, mallory (agents); bob (approvers); carol (security)

    def ask(self, api_key: str, text: str) -> tuple[threading.Thread, dict]:
        """A request that will be held, sent with the real openai SDK on a thread of its own."""
        out: dict = {}

        def run() -> None:
            client = openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=api_key, max_retries=0)
            try:
                out["result"] = client.responses.create(model="gpt-test", input=text)
            except Exception as e:  # handed to the test
                out["error"] = e

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, out

    def as_(self, credential: str) -> AdminClient:
        return AdminClient(self.admin, self.tokens.get(credential, credential))

    def oidc(self, subject: str, username: str, groups: list[str]) -> str:
        return self.issuer.token(subject=subject, groups=groups, preferred_username=username)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, confdir, upstream_server):
    workdir = tmp_path_factory.mktemp("approval-visibility")
    issuer = LocalIssuer()
    issuer.add_key("RSA")
    issuer.start()
    rules = make_rules(workdir / "rules", upstreams=[])
    add_test_rules(rules)
    policy = rules / "policy.yaml"
    policy.write_text(policy.read_text().replace("\nrules:\n", "\nrules:\n" + SECURITY_RULE, 1))
    (rules / "identities.yaml").write_text(yaml.safe_dump(
        {"service_tokens": [], "issuers": [{"issuer": issuer.url, "audience": "auditgate"}]}))
    tokens = {name: add_service_token(rules, name, groups) for name, groups in (
        ("alice", ["agents"]), ("mallory", ["agents"]), ("bob", ["agents", "approvers"]), ("carol", ["security"]))}
    gateway = GatewayUnderUmask022(
        workdir / "gw", rules=rules, records=workdir / "records", confdir=confdir, env=gateway_env(),
        args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}", "--set", "approval_admin_listen=127.0.0.1:0"],
    ).start()
    try:
        yield Setup(gateway, admin_url(gateway), issuer, tokens)
    finally:
        gateway.stop()
        issuer.stop()


def _wait_listed(client: AdminClient, marker: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [a for a in client.pending() if marker in a["preview"]]
        if found:
            [approval] = found
            return approval
        time.sleep(0.1)
    raise AssertionError(f"no pending approval with {marker!r} for this caller")


def test_each_caller_sees_their_own_requests_and_those_they_may_decide_nothing_else(setup, upstream):
    alices_thread, alices_out = setup.ask(setup.tokens["alice"], "vis-alice-e2e needs-approval-marker")
    mallorys_thread, mallorys_out = setup.ask(setup.tokens["mallory"], "vis-mallory-e2e security-approval-marker")
    bob, carol, alice, mallory = (setup.as_(n) for n in ("bob", "carol", "alice", "mallory"))
    alices = _wait_listed(bob, "vis-alice-e2e")  # bob approves for the rule that holds alice's request
    mallorys = _wait_listed(carol, "vis-mallory-e2e")  # carol for the one that holds mallory's

    def listing(client: AdminClient, query: str = "") -> tuple[set[str], str]:
        status, body = client.call("GET", f"/api/approvals{query}")
        assert status == 200, body
        return {a["id"] for a in body["approvals"]}, json.dumps(body)

    # A non-approver lists their own request and nothing of anyone else's: not its id, name, nor prompt.
    for query in ("", "?status=pending"):
        ids, text = listing(mallory, query)
        assert alices["id"] not in ids and mallorys["id"] in ids
        assert "vis-alice-e2e" not in text and '"alice"' not in text
    assert mallory.call("GET", f"/api/approvals/{alices['id']}") == (404, {"error": {
        "code": "not_found", "message": f"no approval '{alices['id']}'"}})  # the same as an id that never was
    # Its requester sees it, and may only withdraw it.
    ids, _ = listing(alice)
    assert alices["id"] in ids and mallorys["id"] not in ids
    status, own = alice.call("GET", f"/api/approvals/{alices['id']}")
    assert status == 200 and "vis-alice-e2e" in own["preview"] and own["viewer_may"] == ["deny"]
    assert alice.call("GET", f"/api/approvals/{mallorys['id']}")[0] == 404
    # An approver sees what their groups may decide, and only that.
    ids, _ = listing(bob)
    assert alices["id"] in ids and mallorys["id"] not in ids
    assert bob.call("GET", f"/api/approvals/{mallorys['id']}")[0] == 404
    ids, _ = listing(carol)
    assert mallorys["id"] in ids and alices["id"] not in ids
    # The CLI lists through the same API.
    cli = str(ROOT / ".venv" / "bin" / "auditgate") if (ROOT / ".venv/bin/auditgate").exists() else "auditgate"
    listed = subprocess.run([cli, "approvals", "list", "--all"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "AUDITGATE_TOKEN": setup.tokens["mallory"],
                                 "AUDITGATE_ADMIN_URL": setup.admin})
    assert listed.returncode == 0 and mallorys["id"] in listed.stdout and alices["id"] not in listed.stdout

    assert bob.deny(alices["id"], reason="not now")[0] == 200
    assert carol.deny(mallorys["id"])[0] == 200
    alices_thread.join(15), mallorys_thread.join(15)
    assert alices_out["error"].code == mallorys_out["error"].code == "gateway_approval_denied"
    assert [r for r in upstream.received if b"vis-" in r.body] == []


def _audit_approvals(records) -> list[dict]:
    return [e for path in sorted((records / "audit").glob("audit-*.jsonl"))
            for e in (json.loads(line) for line in path.read_bytes().splitlines() if line.strip())
            if e.get("kind") == "approval"]


def test_four_eyes_compares_subjects_not_display_names(setup, upstream):
    alice = setup.oidc("sub-alice", "alice", ["agents"])
    thread, out = setup.ask(alice, "subject-e2e needs-approval-marker")
    bob = setup.as_("bob")
    held = _wait_listed(bob, "subject-e2e")
    issuer = setup.issuer.url
    assert held["requester"]["name"] == "alice" and held["requester_principal"] == f"oidc:{issuer}#sub-alice"

    # Someone else (another sub) whose IdP name is "alice" with a zero-width space: not alice, so not shown
    # alice's request as hers ...
    lookalike = setup.as_(setup.oidc("sub-impostor", "alice\u200b", ["agents"]))
    assert held["id"] not in {a["id"] for a in lookalike.pending()}
    assert lookalike.call("GET", f"/api/approvals/{held['id']}")[0] == 404
    # ... and, in the approvers group, still refused: a name that reads as the requester's is no second person.
    lookalike_approver = setup.as_(setup.oidc("sub-impostor", "alice\u200b", ["agents", "approvers"]))
    status, body = lookalike_approver.approve(held["id"])
    assert (status, body["error"]["code"]) == (403, "self_approval_refused")
    assert "reads the same" in body["error"]["message"]
    # Alice under another display name (the same sub), in the approvers group: still alice.
    renamed = setup.as_(setup.oidc("sub-alice", "alice-renamed", ["agents", "approvers"]))
    status, body = renamed.approve(held["id"])
    assert (status, body["error"]["code"]) == (403, "self_approval_refused")
    assert "their own request" in body["error"]["message"]
    status, shown = renamed.call("GET", f"/api/approvals/{held['id']}")
    assert status == 200 and shown["viewer_may"] == ["deny"]

    status, body = bob.approve(held["id"], reason="checked")
    assert status == 200 and body["status"] == "approved"
    thread.join(15)
    assert "error" not in out, out.get("error")
    assert out["result"].output_text == "Hello from the fake upstream."

    [flow] = wait_for_flows(setup.gateway.records, lambda f: b"subject-e2e" in (f.request.content or b""))
    record = flow.metadata["auditgate.approval"]
    assert record["decided_by"] == "bob"
    assert [(r["by"]["name"], r["by"]["subject"], r["code"]) for r in record["refusals"]] == [
        ("alice\u200b", "sub-impostor", "self_approval_refused"),
        ("alice-renamed", "sub-alice", "self_approval_refused")]
    # The audit log names every attempt by its stable subject, beside the name.
    deadline = time.monotonic() + 10
    while True:
        entries = [e for e in _audit_approvals(setup.gateway.records) if e["details"]["approval_id"] == held["id"]]
        if len(entries) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    attempts = [(e["decision"], e["approver"], e["details"].get("approver_principal")) for e in entries]
    bob_principal = "service_token:" + token_hash(setup.tokens["bob"]).removeprefix("sha256:")[:16]
    assert attempts == [("requested", None, None),
                        ("refused_approved", "alice\u200b", f"oidc:{issuer}#sub-impostor"),
                        ("refused_approved", "alice-renamed", f"oidc:{issuer}#sub-alice"),
                        ("approved", "bob", bob_principal)]
    assert {e["details"]["requester_principal"] for e in entries} == {f"oidc:{issuer}#sub-alice"}


def test_the_approvals_database_is_private_under_umask_022(setup):
    status = Path(f"/proc/{setup.gateway.proc.pid}/status").read_text()
    assert "\nUmask:\t0022\n" in status  # the gateway really runs under 022
    store = setup.gateway.records / "approvals.sqlite3"
    modes = {suffix: stat.S_IMODE(os.stat(f"{store}{suffix}").st_mode) for suffix in ("", "-wal", "-shm")}
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
