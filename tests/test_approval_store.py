"""Approvals without mitmproxy: four-eyes checks, request keys, and what only the SQLite store does (deciders
racing from two processes on one file, a restart, the file's mode). Attach, reuse and expiry, which every store
must do alike, are in tests/test_approval_store_contract.py."""

from __future__ import annotations

import multiprocessing

import pytest

from auditgate.approval.rules import (
    DecisionRefused,
    check_decider,
    request_key,
    same_person,
)
from auditgate.approval.store import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    SqliteApprovalStore,
)
from tests.approval_candidates import ALICE, BOB, CAROL, candidate
from tests.honesty_approval_race import decide_each

MALLORY = {"name": "mallory", "groups": ["agents"], "method": "service_token", "token_id": "3a11000000000003"}


# ---- four-eyes ---------------------------------------------------------------------------------------
def _check(decider: dict, decision: str = "approve", requester: dict = ALICE, status: str = PENDING) -> None:
    check_decider(requester=requester, approver_groups=["approvers", "security"], status=status, decider=decider,
                  decision=decision)


def test_an_approver_who_is_someone_else_may_decide():
    _check(BOB)
    _check(BOB, "deny")


def test_nobody_approves_their_own_request_whatever_their_groups():
    requester = {"name": "root", "groups": ["approvers", "security", "admins"]}
    with pytest.raises(DecisionRefused) as info:
        _check(requester, requester=requester)
    assert (info.value.status, info.value.code) == (403, "self_approval_refused")


@pytest.mark.parametrize("requester, decider", [
    ({"name": "Alice"}, {"name": "alice ", "groups": ["approvers"]}),  # same name, other spelling
    ({"name": "alice", "email": "A@corp.example"}, {"name": "alice-oidc", "email": "a@corp.example",
                                                    "groups": ["approvers"]}),
    ({"name": "x", "issuer": "https://idp", "subject": "42"}, {"name": "y", "issuer": "https://idp", "subject": "42",
                                                               "groups": ["approvers"]}),
])
def test_the_same_person_under_another_credential_is_still_the_requester(requester, decider):
    assert same_person(requester, decider)
    with pytest.raises(DecisionRefused, match="self_approval_refused"):
        _check(decider, requester=requester)


def test_an_approver_must_be_in_one_of_the_rules_approver_groups():
    with pytest.raises(DecisionRefused) as info:
        _check(MALLORY)
    assert (info.value.status, info.value.code) == (403, "not_an_approver")
    with pytest.raises(DecisionRefused, match="not_an_approver"):
        _check(MALLORY, "deny")


def test_a_requester_may_withdraw_but_not_approve():
    _check(ALICE, "deny")
    with pytest.raises(DecisionRefused, match="self_approval_refused"):
        _check(ALICE, "approve")


def test_a_decided_request_cannot_be_decided_again():
    with pytest.raises(DecisionRefused) as info:
        _check(BOB, status=APPROVED)
    assert (info.value.status, info.value.code) == (409, "already_decided")


def test_request_key_is_the_same_for_a_retry_and_differs_for_anything_else():
    base = ("alice", "POST", "api.openai.com", 443, "/v1/responses", b'{"input": "x"}')
    key, body_hash = request_key(*base)
    assert request_key(*base) == (key, body_hash)
    # A retry may spell the method and the host differently (both are case-insensitive) ...
    assert request_key("alice", "post", "API.openai.com", 443, "/v1/responses", b'{"input": "x"}')[0] == key
    # ... but never the caller: identity names are exact ("ALICE" may be another entry of identities.yaml),
    # and one caller's request must not attach to, or reuse, another caller's approval.
    assert request_key("ALICE", "POST", "api.openai.com", 443, "/v1/responses", b'{"input": "x"}')[0] != key
    assert request_key("ALICE", "post", "API.openai.com", 443, "/v1/responses", b'{"input": "x"}')[0] != key
    for changed in (("bob",) + base[1:], base[:4] + ("/v1/chat/completions", base[5]), base[:5] + (b'{"input": "y"}',)):
        assert request_key(*changed)[0] != key


# ---- the store -----------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    s = SqliteApprovalStore(tmp_path / "approvals.sqlite3")
    yield s
    s.close()


def _race(path, approval_ids: list[str], pause: float) -> dict[str, list[tuple]]:
    """Two processes, each with its own connection to the store file, decide every approval at the same
    moment (a barrier before each one): bob approves, carol denies. Returns each one's outcomes."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=decide_each, args=(str(path), approval_ids, status, who, barrier, results, pause))
               for status, who in ((APPROVED, BOB), (DENIED, CAROL))]
    for worker in workers:
        worker.start()
    try:
        outcomes = dict(results.get(timeout=120) for _ in workers)
    finally:
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    return outcomes


@pytest.mark.parametrize("rounds, pause", [(150, 0.0), (15, 0.05)], ids=["as-fast-as-possible", "both-read-first"])
def test_decide_once_only_even_when_racing(store, rounds, pause):
    held = [store.hold(candidate(key=f"k{i}"), f"f{i}", 1000)[0].id for i in range(rounds)]
    outcomes = _race(store.path, held, pause)
    late = 0
    for i, approval_id in enumerate(held):
        mine = {status: outcomes[status][i] for status in (APPROVED, DENIED)}
        assert {o[0] for o in mine.values()} == {approval_id}
        winners = [status for status, o in mine.items() if o[1] == "won"]
        assert len(winners) == 1, (approval_id, mine)  # exactly one decision, never two
        [loser] = [o for status, o in mine.items() if status not in winners]
        assert loser[1] == "already_decided", (approval_id, mine)
        late += "a moment ago" in loser[2]  # both had read it pending: the conditional update stopped the second
        decided = store.get(approval_id)
        assert decided.status == winners[0] and decided.decided_by == (BOB if winners[0] == APPROVED else CAROL)
    if pause:
        assert late >= 1, "the two deciders never both read the approval as pending: no race took place"
    with pytest.raises(DecisionRefused) as info:
        store.decide("apr_missing", APPROVED, BOB, None, 1)
    assert info.value.code == "not_found"


def test_after_a_restart_approvals_whose_flows_are_gone_are_closed_as_expired(tmp_path):
    path = tmp_path / "approvals.sqlite3"
    before = SqliteApprovalStore(path)
    gone, _ = before.hold(candidate("k1", instance="old"), "f1", 1000)
    decided, _ = before.hold(candidate("k2", instance="old"), "f2", 1000)
    before.decide(decided.id, APPROVED, BOB, "ok", 1001)
    before.close()
    after = SqliteApprovalStore(path)
    try:
        assert len(after.expire_orphans("new", 1002)) == 1
        closed = after.get(gone.id)
        assert closed.status == EXPIRED and "stopped" in closed.reason
        assert after.get(decided.id).status == APPROVED  # history is kept as it was
        mine, _ = after.hold(candidate("k3", instance="new"), "f3", 1003)
        assert after.expire_orphans("new", 1004) == [] and after.get(mine.id).status == PENDING
    finally:
        after.close()


def test_refusals_are_kept_with_the_approval_and_the_file_is_private(store, tmp_path):
    held, _ = store.hold(candidate(), "f1", 1000)
    store.add_refusal(held.id, {"by": {"name": "alice"}, "code": "self_approval_refused"})
    assert store.get(held.id).refusals == [{"by": {"name": "alice"}, "code": "self_approval_refused"}]
    assert (tmp_path / "approvals.sqlite3").stat().st_mode & 0o077 == 0
