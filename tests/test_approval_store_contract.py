"""One contract for every approvals store, run against SQLite and a real PostgreSQL server (tests/postgres_server.py):
attach and retry de-dup, reuse windows, four-eyes' single decision under races, expiry inside the deciding
statement, audits that roll back, instance leases, and failing closed when the store cannot answer."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest

from auditgate.approval.rules import DecisionRefused
from auditgate.approval.store import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    Approval,
    DecisionTooLate,
    SqliteApprovalStore,
    StoreUnavailable,
    ThreadedApprovalStore,
    Viewer,
)
from auditgate.approval.stores import choose_store
from auditgate.core.flow_contract import AuditUnavailable
from tests.approval_candidates import ALICE, BOB, CAROL, candidate
from tests.approval_gateway import StoreLocker
from tests.postgres_server import postgres_server  # noqa: F401  (a fixture)


class Backend:
    """One store's backing (a SQLite file, a PostgreSQL database): opens as many connections to it as asked."""

    def __init__(self, kind: str, tmp_path, server) -> None:
        self.kind, self.server = kind, server
        if kind == "sqlite":
            self.option, self.path = "", tmp_path / "approvals.sqlite3"
        else:
            self.dsn = server.new_database()
            self.option, self.path = self.dsn, None
        self.opened: list = []

    def open(self, busy_timeout: float = 2.0):
        if self.kind == "sqlite":
            store = SqliteApprovalStore(self.path, busy_timeout)
        else:
            from auditgate.approval.postgres import PostgresApprovalStore

            store = PostgresApprovalStore(self.dsn, busy_timeout)
        self.opened.append(store)
        return store

    def threaded(self, busy_timeout: float = 2.0) -> ThreadedApprovalStore:
        return choose_store(self.option, self.path.parent if self.path else None).threaded(busy_timeout)

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    server = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    b = Backend(request.param, tmp_path, server)
    yield b
    b.close()


@pytest.fixture
def store(backend):
    return backend.open()


# ---- holding: attach, retries, reuse ------------------------------------------------------------------
def test_a_retry_attaches_to_the_pending_approval(store):
    first, how = store.hold(candidate(), "flow-1", 1000)
    assert how == "created" and first.status == PENDING
    again, how = store.hold(candidate(), "flow-2", 1005)
    assert how == "attached" and again.id == first.id
    assert store.get(first.id).flows == ["flow-1", "flow-2"]
    assert [a.id for a in store.list(PENDING)] == [first.id]


def test_other_requests_get_their_own_approval(store):
    a, _ = store.hold(candidate("k1"), "f1", 1000)
    b, how = store.hold(candidate("k2"), "f2", 1000)
    c, how_c = store.hold(candidate("k1", rule="other"), "f3", 1000)
    assert how == how_c == "created" and len({a.id, b.id, c.id}) == 3


def test_an_approval_whose_flow_gave_up_goes_to_the_retry_once(store):
    held, _ = store.hold(candidate(), "f1", 1000)
    store.decide(held.id, APPROVED, BOB, "fine", 1010)
    retry, how = store.hold(candidate(), "f2", 1011)  # the original's client timed out before the decision
    assert (retry.id, how) == (held.id, "attached")
    assert store.claim(held.id, "f2", 1011)
    assert store.claim(held.id, "f2", 1011)  # the same flow asking again is the same request
    assert not store.claim(held.id, "f1", 1011)  # one approval, one request upstream
    # Used now, and no reuse window: an identical request needs a new approval.
    later, how = store.hold(candidate(), "f3", 1012)
    assert how == "created" and later.id != held.id


def test_reuse_window_lets_identical_requests_through_until_it_ends(store):
    held, _ = store.hold(candidate(reuse=30), "f1", 1000)
    store.decide(held.id, APPROVED, BOB, None, 1010)
    assert store.claim(held.id, "f1", 1010)
    reused, how = store.hold(candidate(reuse=30), "f2", 1039)
    assert (reused.id, how) == (held.id, "reused") and store.claim(held.id, "f2", 1039)
    fresh, how = store.hold(candidate(reuse=30), "f3", 1041)
    assert how == "created" and fresh.id != held.id


def test_a_denied_or_expired_approval_is_not_reused_and_an_expired_pending_one_not_attached_to(store):
    for status in (DENIED, EXPIRED):
        held, _ = store.hold(candidate(key=status, reuse=30), "f1", 1000)
        store.decide(held.id, status, BOB if status == DENIED else None, "no", 1001)
        assert not store.claim(held.id, "f1", 1001)
        again, how = store.hold(candidate(key=status, reuse=30), "f2", 1002)
        assert how == "created" and again.id != held.id
    held, _ = store.hold(candidate("k-timeout", timeout=5), "f1", 1000)
    again, how = store.hold(candidate("k-timeout", timeout=5), "f2", 1006)
    assert how == "created" and again.id != held.id


def test_a_request_and_its_retry_racing_on_two_connections_share_one_approval(backend):
    stores = [backend.open(), backend.open()]
    for round_ in range(20):
        barrier, out = threading.Barrier(2, timeout=30), []

        def hold(store, flow_id):
            barrier.wait()
            out.append(store.hold(candidate(f"race-{round_}"), flow_id, 1000))
        threads = [threading.Thread(target=hold, args=(s, f"f{i}")) for i, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(how for _, how in out) == ["attached", "created"]
        assert len({a.id for a, _ in out}) == 1
        assert sorted(stores[0].get(out[0][0].id).flows) == ["f0", "f1"]


# ---- deciding -----------------------------------------------------------------------------------------
def test_deciders_racing_on_two_connections_never_both_win(backend):
    stores = [backend.open(), backend.open()]
    held = [stores[0].hold(candidate(key=f"k{i}"), f"f{i}", 1000)[0].id for i in range(30)]
    outcomes: dict[str, list] = {APPROVED: [], DENIED: []}
    barrier = threading.Barrier(2, timeout=30)

    def decide(store, status, by):
        for approval_id in held:
            barrier.wait()
            try:
                store.decide(approval_id, status, by, None, 1001)
                outcomes[status].append("won")
            except DecisionRefused as e:
                outcomes[status].append(e.code)
    threads = [threading.Thread(target=decide, args=(stores[0], APPROVED, BOB)),
               threading.Thread(target=decide, args=(stores[1], DENIED, CAROL))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, approval_id in enumerate(held):
        mine = {outcomes[APPROVED][i], outcomes[DENIED][i]}
        assert mine == {"won", "already_decided"}, (approval_id, mine)
        winner = APPROVED if outcomes[APPROVED][i] == "won" else DENIED
        assert stores[1].get(approval_id).status == winner
    with pytest.raises(DecisionRefused) as info:
        stores[0].decide("apr_missing", APPROVED, BOB, None, 1)
    assert info.value.code == "not_found"


def test_a_decision_at_or_after_the_expiry_is_refused_and_closes_the_approval(store):
    held, _ = store.hold(candidate(timeout=10), "f1", 1000)
    with pytest.raises(DecisionTooLate) as info:
        store.decide(held.id, APPROVED, BOB, "late", 1010)
    assert info.value.code == "approval_expired" and info.value.approval.status == EXPIRED
    closed = store.get(held.id)
    assert (closed.status, closed.decided_by) == (EXPIRED, None)
    with pytest.raises(DecisionRefused, match="already_decided"):
        store.decide(held.id, DENIED, BOB, None, 1011)


def _audit_fails(approval: Approval) -> None:
    raise AuditUnavailable("disk full")


def test_a_decision_or_a_hold_whose_audit_fails_does_not_stand(backend):
    store, other = backend.open(), backend.open()
    held, _ = store.hold(candidate(), "f1", 1000)
    seen = {}

    def audit(approval: Approval) -> None:
        seen["decision"] = approval.status
        seen["others_see"] = other.get(held.id).status  # not committed yet
        raise AuditUnavailable("disk full")
    with pytest.raises(AuditUnavailable):
        store.decide(held.id, APPROVED, BOB, "fine", 1001, before_commit=audit)
    assert seen == {"decision": APPROVED, "others_see": PENDING}
    assert other.get(held.id).status == PENDING
    with pytest.raises(AuditUnavailable):
        store.hold(candidate("k-new"), "f2", 1000, on_create=_audit_fails)
    assert [a.id for a in other.list()] == [held.id]
    assert store.decide(held.id, APPROVED, BOB, "fine", 1002).status == APPROVED


def test_refusals_attempts_and_abandoned_approvals(store):
    held, _ = store.hold(candidate(), "f1", 1000)
    store.add_refusal(held.id, {"by": {"name": "alice"}, "code": "self_approval_refused"})
    store.add_refusal(held.id, {"by": {"name": "mallory"}, "code": "not_an_approver"})
    assert [r["code"] for r in store.get(held.id).refusals] == ["self_approval_refused", "not_an_approver"]
    store.hold(candidate(), "f2", 1001)  # a retry attached since the count of 1 was taken
    assert store.cancel_abandoned(held.id, 1, 1002, "gone") is None and store.get(held.id).status == PENDING
    closed = store.cancel_abandoned(held.id, 2, 1003, "gone")
    assert (closed.status, closed.reason) == (EXPIRED, "gone")


def test_overdue_approvals_are_closed_once(store):
    due, _ = store.hold(candidate("k1", timeout=5), "f1", 1000)
    later, _ = store.hold(candidate("k2", timeout=50), "f2", 1000)
    assert [a.id for a in store.expire_overdue(1005)] == [due.id]
    assert store.expire_overdue(1006) == []
    assert store.get(later.id).status == PENDING and store.get(due.id).status == EXPIRED


def test_listings_show_a_viewer_their_own_and_what_their_groups_decide(store):
    mine, _ = store.hold(candidate("k1"), "f1", 1000)
    other = candidate("k2", now=1001)
    other.requester, other.requester_principal, other.approver_groups = BOB, "service_token:" + BOB["token_id"], ["sec"]
    theirs, _ = store.hold(other, "f2", 1001)
    assert [a.id for a in store.list(viewer=Viewer.of(ALICE))] == [mine.id]
    assert [a.id for a in store.list(viewer=Viewer.of(CAROL))] == [mine.id]
    assert [a.id for a in store.list(viewer=Viewer.of(BOB))] == [theirs.id, mine.id]
    assert store.list(viewer=Viewer(None, ("nobody",))) == []
    assert [a.id for a in store.list(PENDING, limit=1)] == [theirs.id]


# ---- instances ------------------------------------------------------------------------------------------
def test_a_pending_approval_is_closed_by_another_instance_only_once_its_holders_lease_lapsed(store):
    store.heartbeat("a/1", "a", 1000, 10)
    store.heartbeat("b/1", "b", 1000, 10)
    on_a, _ = store.hold(candidate("k1", instance="a", holder="a/1"), "f1", 1000)
    on_b, _ = store.hold(candidate("k2", instance="b", holder="b/1"), "f2", 1000)
    assert store.expire_orphans("b/1", 1005) == []  # a lives
    store.heartbeat("a/1", "a", 1008, 10)  # and renews
    assert store.expire_orphans("b/1", 1015) == []
    [closed] = store.expire_orphans("b/1", 1019)  # a's lease lapsed at 1018: a died
    assert closed.id == on_a.id and closed.status == EXPIRED and "stopped" in closed.reason
    assert store.get(on_b.id).status == PENDING  # never one's own, and b never lapsed for itself
    assert store.expire_orphans("b/1", 1030) == []
    lives = {i["holder"]: i["live"] for i in store.instances(1019)}
    assert lives == {"a/1": False, "b/1": False}
    store.heartbeat("b/1", "b", 1030, 10)
    store.release("b/1")  # b stopping: its requests go with it, at once
    assert [a.id for a in store.expire_orphans("c/1", 1031)] == [on_b.id]


# ---- failing closed ------------------------------------------------------------------------------------------
def test_a_lock_held_past_the_busy_timeout_is_store_unavailable(backend):
    store = backend.open(busy_timeout=0.3)
    held, _ = store.hold(candidate(), "f1", 1000)
    if backend.kind == "sqlite":
        locker = StoreLocker(backend.path)
    else:  # another session holding the row (and every write) in an open transaction
        conn = psycopg.connect(backend.dsn)
        conn.execute("SELECT * FROM approvals WHERE id = %s FOR UPDATE", (held.id,))
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.decide(held.id, APPROVED, BOB, None, 1001)
        assert time.monotonic() - started < 3
        assert backend.kind == "sqlite" or backend.server.password not in str(info.value)
    finally:
        locker.release() if backend.kind == "sqlite" else conn.close()
    assert store.decide(held.id, APPROVED, BOB, None, 1002).status == APPROVED


def test_the_threaded_store_pushes_decisions_made_elsewhere_at_once(backend):
    async def main():
        threaded = backend.threaded()
        threaded.open_now()
        changed: list = []
        arrived = asyncio.Event()

        def on_change(approval_id):
            changed.append(approval_id)
            if approval_id is not None:
                arrived.set()
        try:
            threaded.listen(on_change)
            held, _ = await threaded.hold(candidate(now=time.time()), "f1", time.time())
            if not threaded.pushes_changes:
                return None
            for _ in range(100):  # the listener is connected once it said so (None)
                if None in changed:
                    break
                await asyncio.sleep(0.05)
            other = backend.open()  # another instance decides
            started = time.monotonic()
            await asyncio.to_thread(other.decide, held.id, APPROVED, BOB, None, time.time())
            await asyncio.wait_for(arrived.wait(), 2)
            return held.id, time.monotonic() - started, changed
        finally:
            threaded.close()

    result = asyncio.run(main())
    if backend.kind == "sqlite":
        assert result is None  # SQLite cannot tell: held flows re-read it every second
        return
    approval_id, waited, changed = result
    assert changed[-1] == approval_id and waited < 1.0


def test_a_store_that_is_gone_fails_closed_and_comes_back(backend, tmp_path):
    if backend.kind == "sqlite":
        pytest.skip("the SQLite store's missing, replaced and corrupt files: test_approval_store_faults.py")
    store = backend.open(busy_timeout=0.5)
    held, _ = store.hold(candidate(), "f1", 1000)
    backend.server.stop("fast")  # (immediate would lose the commits synchronous_commit=off has not flushed)
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.decide(held.id, APPROVED, BOB, None, 1001)
        assert backend.server.password not in str(info.value)
        with pytest.raises(StoreUnavailable):
            store.claim(held.id, "f1", 1001)
    finally:
        backend.server.restart()
    deadline = time.monotonic() + 15
    while True:
        try:
            assert store.decide(held.id, APPROVED, BOB, None, 1002).status == APPROVED
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store did not come back after the server did"
            time.sleep(0.2)


def test_the_postgres_schema_is_versioned_and_a_newer_one_refused(backend):
    if backend.kind == "sqlite":
        pytest.skip("SQLite's schema versions: test_approval_store.py and test_approval_store_faults.py")
    from auditgate.approval.postgres import SCHEMA_VERSION, PostgresApprovalStore

    store = backend.open()
    held, _ = store.hold(candidate(), "f1", 1000)
    assert store.schema_version() == SCHEMA_VERSION
    again = backend.open()  # a second gateway starting on a current schema changes nothing
    assert again.get(held.id).id == held.id
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute("UPDATE auditgate_schema SET version = 99 WHERE component = 'approvals'")
    with pytest.raises(StoreUnavailable, match="schema version 99"):
        PostgresApprovalStore(backend.dsn)


def test_the_dsn_comes_from_the_option_or_the_environment_and_is_never_shown(tmp_path):
    secret = "postgresql://u:s3cret-pw@db.internal:6543/approvals"
    choice = choose_store("env:APPROVALS_DSN", tmp_path, {"APPROVALS_DSN": secret})
    assert choice.dsn == secret and "s3cret" not in repr(choice) and "s3cret" not in choice.description
    assert choice.description.endswith("db.internal:6543/approvals")
    assert choose_store("", tmp_path).path == tmp_path / "approvals.sqlite3"
    for value, environ in (("env:MISSING", {}), ("mysql://u:s3cret-pw@h/db", {}),
                           ("postgresql://u:s3cret-pw@h:notaport:x/db?bad", {})):
        with pytest.raises(ValueError) as info:
            choose_store(value, tmp_path, environ)
        assert "s3cret" not in str(info.value)
    with pytest.raises(StoreUnavailable) as info:  # nothing listens there
        choose_store("postgresql://u:s3cret-pw@127.0.0.1:1/db", tmp_path).threaded(0.5).open_now()
    assert "s3cret" not in str(info.value)
