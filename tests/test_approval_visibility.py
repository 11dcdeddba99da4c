"""Approvals seen and decided by the right people (no mitmproxy): principals, look-alike names, what a viewer
is shown, the store's schema upgrade, and its files' modes under a umask of 022."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from auditgate.approval.rules import (
    DecisionRefused,
    check_decider,
    decisions_open_to,
    may_see,
    normalized_name,
    principal_of,
    same_person,
    visible_name,
)
from auditgate.approval.store import (
    APPROVED,
    PENDING,
    SCHEMA_VERSION,
    Approval,
    SqliteApprovalStore,
    StoreUnavailable,
    Viewer,
    new_approval_id,
    public_view,
)
from auditgate.identity.service_tokens import (
    add_service_token,
    load_service_tokens,
    token_hash,
)
from tests.gateway_process import ROOT

ISSUER = "https://idp.example"
ALICE = {"name": "alice", "groups": ["agents"], "method": "oidc", "issuer": ISSUER, "subject": "sub-alice"}
# Another person (another sub) whose IdP let them pick a name that shows as "alice".
ALICE_ZW = {"name": "alice\u200b", "groups": ["agents", "approvers"], "method": "oidc", "issuer": ISSUER,
            "subject": "sub-mallory"}
# Alice again (the same sub) after her IdP changed her display name and gave her the approvers group.
ALICE_RENAMED = {"name": "alice.new@corp.example", "email": "alice.new@corp.example", "groups": ["approvers"],
                 "method": "oidc", "issuer": ISSUER, "subject": "sub-alice"}
BOB = {"name": "bob", "groups": ["approvers"], "method": "service_token", "token_id": "b0b0000000000002"}
MALLORY = {"name": "mallory", "groups": ["agents"], "method": "service_token", "token_id": "3a11000000000003"}
CAROL = {"name": "carol", "groups": ["security"], "method": "service_token", "token_id": "ca40100000000004"}


def _check(decider: dict, decision: str = "approve", requester: dict = ALICE) -> None:
    check_decider(requester=requester, approver_groups=["approvers"], status=PENDING, decider=decider,
                  decision=decision)


# ---- principals and names ----------------------------------------------------------------------------------
def test_the_principal_is_issuer_and_sub_or_the_token_id_never_the_name():
    assert principal_of(ALICE) == f"oidc:{ISSUER}#sub-alice" == principal_of(ALICE_RENAMED)
    assert principal_of(ALICE_ZW) == f"oidc:{ISSUER}#sub-mallory"
    assert principal_of(BOB) == "service_token:b0b0000000000002"
    assert principal_of({"name": "alice", "method": "service_token"}) is None  # no stable subject: no principal
    # The same sub at another issuer is someone else.
    assert principal_of({**ALICE, "issuer": "https://other.example"}) != principal_of(ALICE)


def test_service_token_identities_carry_their_token_id(tmp_path):
    token = add_service_token(tmp_path, "svc", ["agents"])
    metadata = load_service_tokens(tmp_path).authenticate(token).as_metadata()
    assert metadata["token_id"] == token_hash(token).removeprefix("sha256:")[:16]
    assert token not in json.dumps(metadata) and token_hash(token) not in json.dumps(metadata)
    assert principal_of(metadata) == f"service_token:{metadata['token_id']}"


@pytest.mark.parametrize("spelling", [
    "alice\u200b", "\u200balice", "al\u200cice", "ali\u200dce", "alice\u2060", "\ufeffalice", "ali\u00adce",
    "ALICE", "Alice ", "ａｌｉｃｅ", "alice\ufe0f", "a\u034flice", "\u202ealice", "alice\x00",
])
def test_names_that_read_the_same_normalize_the_same(spelling):
    assert normalized_name(spelling) == "alice"
    assert visible_name(spelling).casefold() == "alice"


def test_a_look_alike_name_with_another_sub_cannot_approve_and_is_not_the_requester():
    assert same_person(ALICE, ALICE_ZW) and not may_see(ALICE, ["security"], ALICE_ZW)
    with pytest.raises(DecisionRefused) as info:
        _check(ALICE_ZW)
    assert (info.value.status, info.value.code) == (403, "self_approval_refused")
    assert "reads the same" in info.value.message
    # Not the requester either: a name that reads the same withdraws nothing it may not decide.
    with pytest.raises(DecisionRefused, match="not_an_approver"):
        check_decider(requester=ALICE, approver_groups=["security"], status=PENDING, decider=ALICE_ZW,
                      decision="deny")


def test_the_same_sub_under_another_name_is_still_the_requester():
    with pytest.raises(DecisionRefused) as info:
        _check(ALICE_RENAMED)  # in the approvers group, and another name: still alice
    assert info.value.code == "self_approval_refused" and "their own request" in info.value.message
    _check(ALICE_RENAMED, "deny")  # withdrawing her own request
    assert decisions_open_to(ALICE, ["approvers"], PENDING, ALICE_RENAMED) == ["deny"]
    assert decisions_open_to(ALICE, ["approvers"], PENDING, BOB) == ["approve", "deny"]
    assert decisions_open_to(ALICE, ["approvers"], APPROVED, BOB) == []


def test_who_may_see_an_approval():
    assert may_see(ALICE, ["approvers"], ALICE) and may_see(ALICE, ["approvers"], ALICE_RENAMED)
    assert may_see(ALICE, ["approvers"], BOB) and not may_see(ALICE, ["security"], BOB)
    assert not may_see(ALICE, ["approvers"], MALLORY)
    assert not may_see({"name": "alice"}, ["approvers"], {"name": "alice"})  # no principal, no ownership


# ---- the store's listing -------------------------------------------------------------------------------------
def _candidate(requester: dict, key: str, approvers: tuple[str, ...] = ("approvers",), now: float = 1000.0):
    return Approval(id=new_approval_id(), key=key, rule="r", requester=requester, approver_groups=list(approvers),
                    created_at=now, expires_at=now + 60, instance="i1", body_sha256="b" * 64,
                    preview=f"{requester['name']}'s prompt")


@pytest.fixture
def store(tmp_path):
    s = SqliteApprovalStore(tmp_path / "approvals.sqlite3")
    yield s
    s.close()


def test_the_store_lists_a_viewer_their_own_and_what_they_may_decide(store):
    alices = store.hold(_candidate(ALICE, "a"), "f1", 1000)[0]
    security = store.hold(_candidate(MALLORY, "m", approvers=("security",)), "f2", 1001)[0]
    # Many newer requests of someone else's, beyond the listing's limit: the filter runs before the limit.
    for i in range(30):
        store.hold(_candidate(BOB, f"b{i}", approvers=("nobody",), now=1100 + i), f"fb{i}", 1100 + i)

    def listed(viewer: dict, **kw) -> set[str]:
        return {a.id for a in store.list(viewer=Viewer.of(viewer), limit=10, **kw)}

    assert listed(ALICE) == {alices.id} == listed(ALICE_RENAMED)
    assert listed(ALICE_ZW) == {alices.id}  # as an approver (it may deny it), not as alice
    assert listed({**ALICE_ZW, "groups": ["agents"]}) == set()
    assert listed(MALLORY) == {security.id}  # her own
    assert listed(CAROL) == {security.id}  # security decides it
    bobs = {a.id for a in store.list(limit=100) if a.requester == BOB}
    assert len(bobs) == 30 and listed(BOB, status=PENDING) <= bobs  # his own 10 newest, by the limit
    assert {a.id for a in store.list(PENDING, 100, Viewer.of(BOB))} == bobs | {alices.id}
    assert len(store.list(limit=10)) == 10  # no viewer: everything (the gateway's own use)


def test_what_a_requester_is_shown_of_their_own_decided_request(store):
    held = store.hold(_candidate(ALICE, "a"), "f1", 1000)[0]
    store.add_refusal(held.id, {"by": {"name": "alice\u200b", "subject": "sub-mallory"}, "decision": "approve",
                                "code": "self_approval_refused", "at": 1001})
    decided = store.decide(held.id, APPROVED, {"name": "bob", "token_id": "b0b0000000000002",
                                               "groups": ["approvers"]}, "ok", 1002)
    own = public_view(decided, 1003, ALICE)
    assert own["decided_by"] == {"name": "bob"} and own["reason"] == "ok"
    assert own["refusals"] == [{"decision": "approve", "code": "self_approval_refused", "at": 1001}]
    assert "sub-mallory" not in json.dumps(own) and "b0b0000000000002" not in json.dumps(own)
    approver = public_view(decided, 1003, BOB)
    assert approver["decided_by"]["token_id"] == "b0b0000000000002" and approver["refusals"][0]["by"]
    assert approver["requester_principal"] == f"oidc:{ISSUER}#sub-alice"
    zw = public_view(store.hold(_candidate(ALICE_ZW, "z"), "f2", 1000)[0], 1003, BOB)
    assert zw["requester_display"] == "alice" and zw["requester"]["name"] == "alice\u200b"


# ---- the schema, old stores and new ----------------------------------------------------------------------------
_V0 = """
CREATE TABLE approvals (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, rule TEXT NOT NULL, requester TEXT NOT NULL,
    approver_groups TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, reuse_seconds REAL NOT NULL,
    status TEXT NOT NULL, model TEXT, method TEXT, host TEXT, path TEXT, body_sha256 TEXT, preview TEXT, tools TEXT,
    instance TEXT, flows TEXT, forwarded TEXT, decided_at REAL, decided_by TEXT, reason TEXT, refusals TEXT
);
CREATE INDEX approvals_by_key ON approvals (key, created_at);
CREATE INDEX approvals_by_status ON approvals (status, created_at);
"""


def _v0_store(path) -> None:
    """A store as the first release wrote it (schema version 0), left 0644 with its WAL, as an old umask made it."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_V0)
    for approval_id, requester in (("apr_oidc", {**ALICE, "groups": ["agents"]}), ("apr_token", {"name": "svc"})):
        db.execute("INSERT INTO approvals VALUES (?, 'k', 'r', ?, '[\"approvers\"]', 1, 2, 0, 'approved', NULL, "
                   "'POST', 'h', '/v1/responses', 'b', 'preview', '[]', 'i', '[]', '[]', 2, NULL, NULL, '[]')",
                   (approval_id, json.dumps(requester)))
    os.chmod(path, 0o644)
    return db  # kept open: its -wal and -shm files stay


def test_an_old_store_is_upgraded_in_place_and_its_files_made_private(tmp_path):
    path = tmp_path / "approvals.sqlite3"
    old = _v0_store(path)
    try:
        for suffix in ("-wal", "-shm"):
            os.chmod(f"{path}{suffix}", 0o644)
        store = SqliteApprovalStore(path)
        try:
            assert store._schema_version() == SCHEMA_VERSION == 2
            assert store.get("apr_oidc").holder == "i"  # version 2: the holder, backfilled from the instance
            assert store.get("apr_oidc").requester_principal == f"oidc:{ISSUER}#sub-alice"
            assert store.get("apr_token").requester_principal is None  # no token id then: approvers only
            assert [a.id for a in store.list(viewer=Viewer.of(ALICE))] == ["apr_oidc"]
            assert {a.id for a in store.list(viewer=Viewer.of(BOB))} == {"apr_oidc", "apr_token"}
            assert {a.id for a in store.list(viewer=Viewer.of({"name": "svc", "groups": []}))} == set()
            stored = old.execute("SELECT requester_principal FROM approvals WHERE id = 'apr_oidc'").fetchone()
            assert stored == (f"oidc:{ISSUER}#sub-alice",)  # in the file, where the SQL filter reads it
            for suffix in ("", "-wal", "-shm"):
                assert stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) == 0o600, suffix
        finally:
            store.close()
        again = SqliteApprovalStore(path)  # opened again: already current, nothing to do
        again.close()
    finally:
        old.close()


def test_a_store_from_a_newer_gateway_is_refused(tmp_path):
    path = tmp_path / "approvals.sqlite3"
    SqliteApprovalStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreUnavailable, match="newer than this gateway"):
        SqliteApprovalStore(path)


# ---- file modes under a umask of 022 ---------------------------------------------------------------------------
_UNDER_UMASK_022 = textwrap.dedent("""
    import json, os, stat, sys
    from pathlib import Path
    os.umask(0o022)
    from auditgate.approval.store import Approval, SqliteApprovalStore
    root = Path(sys.argv[1])
    path = root / "records" / "nested" / "approvals.sqlite3"
    store = SqliteApprovalStore(path)
    store.hold(Approval(id="apr_1", key="k", rule="r", requester={"name": "alice"}, approver_groups=["a"],
                        created_at=1, expires_at=2, preview="alice's prompt"), "f1", 1)
    modes = {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted(root.rglob("*"))}
    modes["umask"] = oct(os.umask(0o022))
    print(json.dumps(modes))
    store.close()
""")


def test_the_store_and_its_directories_are_private_under_umask_022(tmp_path):
    done = subprocess.run([sys.executable, "-c", _UNDER_UMASK_022, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    modes = json.loads(done.stdout)
    assert modes.pop("umask") == "0o22"  # the process really ran under 022
    assert modes == {"records": "0o700", "records/nested": "0o700", "records/nested/approvals.sqlite3": "0o600",
                     "records/nested/approvals.sqlite3-wal": "0o600", "records/nested/approvals.sqlite3-shm": "0o600"}
