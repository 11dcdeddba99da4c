"""The approvals store when time runs out or the file misbehaves (no mitmproxy).

- An approval never outlives its expiry: the expiry is compared inside the deciding UPDATE, raced for real
  by two processes on one store file.
- A decision that cannot be audited never stands: the audit runs inside the store's transaction.
- The store thread keeps the event loop free: a store locked by another process fails the call after the
  busy timeout (StoreUnavailable) while the loop keeps turning; a missing, replaced, corrupt or full store
  fails the same way.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import threading
import time

import pytest

from auditgate.approval.rules import DecisionRefused
from auditgate.approval.store import (
    APPROVED,
    EXPIRED,
    PENDING,
    Approval,
    DecisionTooLate,
    SqliteApprovalStore,
    StoreUnavailable,
    ThreadedApprovalStore,
    new_approval_id,
)
from auditgate.core.flow_contract import AuditUnavailable
from tests.approval_gateway import StoreLocker
from tests.honesty_approval_race import approve_at_expiry, sweep_at_expiry

ALICE = {"name": "alice", "groups": ["agents"], "method": "service_token"}
BOB = {"name": "bob", "groups": ["agents", "approvers"], "method": "service_token"}


def candidate(key: str = "k1", now: float = 1000.0, timeout: float = 60) -> Approval:
    return Approval(id=new_approval_id(), key=key, rule="r", requester=ALICE, approver_groups=["approvers"],
                    created_at=now, expires_at=now + timeout, instance="i1", body_sha256="b" * 64)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "approvals.sqlite3"


@pytest.fixture
def store(path):
    s = SqliteApprovalStore(path)
    yield s
    s.close()


# ---- expiry ----------------------------------------------------------------------------------------------
def test_a_decision_at_or_after_the_expiry_is_refused_and_closes_the_approval_as_expired(store):
    held, _ = store.hold(candidate(timeout=10), "f1", 1000)
    with pytest.raises(DecisionTooLate) as info:
        store.decide(held.id, APPROVED, BOB, "late", 1010)  # at the expiry: too late already
    assert (info.value.status, info.value.code) == (409, "approval_expired")
    assert info.value.approval.status == EXPIRED and info.value.approval.decided_by is None
    closed = store.get(held.id)
    assert closed.status == EXPIRED and closed.decided_by is None and "expired" in closed.reason
    assert not store.claim(held.id, "f1", 1010)
    # Closing it as expired is still allowed to whoever times it out (no decider, no expiry check).
    other, _ = store.hold(candidate("k2", timeout=10), "f2", 1000)
    assert store.decide(other.id, EXPIRED, None, "not decided in time", 1020).status == EXPIRED


def test_the_clock_is_read_once_the_store_holds_the_lock(store, path):
    """A decision asked for before the expiry that waits for the write lock past it does not stand."""
    now = time.time()
    held, _ = store.hold(candidate(now=now, timeout=0.4), "f1", now)
    with StoreLocker(path) as locker:
        threading.Timer(0.8, locker.release).start()  # another process lets go after the expiry
        with pytest.raises(DecisionTooLate):
            store.decide(held.id, APPROVED, BOB, None)  # asked before the expiry; now=None, as the gateway
    assert store.get(held.id).status == EXPIRED


def test_overdue_and_abandoned_approvals_are_closed(store):
    due, _ = store.hold(candidate("k1", timeout=5), "f1", 1000)
    later, _ = store.hold(candidate("k2", timeout=50), "f2", 1000)
    assert [a.id for a in store.expire_overdue(1005)] == [due.id]
    assert store.expire_overdue(1006) == []  # closed once
    assert store.get(later.id).status == PENDING
    # A retry attached after its caller left: the approval is kept for it.
    store.hold(candidate("k2", timeout=50), "f3", 1001)
    assert store.cancel_abandoned(later.id, 1, 1002, "the caller went away") is None
    closed = store.cancel_abandoned(later.id, 2, 1003, "the caller went away")
    assert closed.status == EXPIRED and closed.reason == "the caller went away"
    with pytest.raises(DecisionRefused, match="already_decided"):
        store.decide(later.id, APPROVED, BOB, None, 1004)


def _race_expiry(path, approval_ids: list[str], pause: float, jitter: float, sweep_delay: float,
                 spacing: float) -> dict:
    """An approver and a sweeper, two processes with their own connections to the store file, each acting
    on every approval at the moment it expires (the approver within ±jitter of it)."""
    context = multiprocessing.get_context("spawn")
    ready, barrier, results = context.Barrier(3), context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=approve_at_expiry, args=(str(path), approval_ids, BOB, ready, barrier, results, pause,
                                                        jitter, 7)),
        context.Process(target=sweep_at_expiry, args=(str(path), approval_ids, ready, barrier, results, sweep_delay)),
    ]
    for worker in workers:
        worker.start()
    try:
        ready.wait(timeout=60)  # both processes are up
        # Now the approvals get their expiries, `spacing` apart (more than a round takes: a sweep closes every
        # overdue approval, and must meet only the one of its round), from half a second on.
        start = time.time() + 0.5
        db = sqlite3.connect(path, isolation_level=None)
        for i, approval_id in enumerate(approval_ids):
            db.execute("UPDATE approvals SET expires_at = ? WHERE id = ?", (start + i * spacing, approval_id))
        db.close()
        ready.wait(timeout=60)  # go
        outcomes = dict(results.get(timeout=120) for _ in workers)
    finally:
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    return outcomes


@pytest.mark.parametrize("rounds, pause, jitter, sweep_delay, spacing",
                         [(30, 0.0, 0.01, 0.0, 0.08), (8, 0.06, 0.0, 0.12, 0.3)],
                         ids=["around-the-expiry", "read-before-write-after"])
def test_an_approval_racing_the_expiry_never_stands_after_it(store, path, rounds, pause, jitter, sweep_delay, spacing):
    held = [store.hold(candidate(key=f"k{i}", now=time.time(), timeout=3600), f"f{i}", time.time())[0].id
            for i in range(rounds)]
    outcomes = _race_expiry(path, held, pause, jitter, sweep_delay, spacing)
    approver = {o[0]: o for o in outcomes["approver"]}
    sweeper = {o[0]: o for o in outcomes["sweeper"]}
    approved = expired_by_approver = swept = 0
    for approval_id in held:
        final = store.get(approval_id)
        assert final.status in (APPROVED, EXPIRED), final
        if final.status == APPROVED:
            # Approved only by a decision taken before the expiry, and then the sweep left it alone.
            assert approver[approval_id][1] == "won" and final.decided_at < final.expires_at, (final, approver)
            assert sweeper[approval_id][1] == "lost"
            approved += 1
        else:
            assert approver[approval_id][1] in ("approval_expired", "already_decided"), approver[approval_id]
            assert final.decided_by is None
            expired_by_approver += approver[approval_id][1] == "approval_expired"
            swept += sweeper[approval_id][1] == "won"
            assert not (approver[approval_id][1] == "approval_expired" and sweeper[approval_id][1] == "won")
    if pause:
        # The approver read each one pending before its expiry and wrote after it, before any sweep: only the
        # expiry compared inside its own UPDATE refused it.
        assert approved == 0 and expired_by_approver == rounds
    else:
        assert approved >= 1 and expired_by_approver + swept >= 1, (approved, expired_by_approver, swept)


# ---- a decision that cannot be audited ---------------------------------------------------------------------
def test_a_decision_or_hold_whose_audit_fails_does_not_stand(store, path):
    held, _ = store.hold(candidate(), "f1", 1000)

    def audit_fails(approval: Approval) -> None:
        assert approval.status == APPROVED  # it sees the decision it is asked to record
        raise AuditUnavailable("disk full")

    with pytest.raises(AuditUnavailable):
        store.decide(held.id, APPROVED, BOB, "fine", 1001, before_commit=audit_fails)
    other = SqliteApprovalStore(path)  # another connection: nothing was committed
    try:
        assert other.get(held.id).status == PENDING and store.get(held.id).status == PENDING
        with pytest.raises(AuditUnavailable):
            store.hold(candidate("k-new"), "f2", 1000, on_create=_audit_fails)
        assert [a.id for a in other.list()] == [a.id for a in store.list()] == [held.id]  # nothing held
    finally:
        other.close()
    assert store.decide(held.id, APPROVED, BOB, "fine", 1002).status == APPROVED


def _audit_fails(approval: Approval) -> None:
    raise AuditUnavailable("disk full")


def test_the_threaded_store_audits_on_the_loop_before_the_decision_is_visible(path):
    SqliteApprovalStore(path).close()
    seen: dict = {}

    async def main():
        store = ThreadedApprovalStore(path)
        try:
            held, _ = await store.hold(candidate(), "f1", 1000)
            loop_thread = threading.get_ident()

            def audit(approval: Approval) -> None:
                seen["on_loop"] = threading.get_ident() == loop_thread
                with sqlite3.connect(path) as other:  # what everyone else sees meanwhile
                    seen["visible_meanwhile"] = other.execute("SELECT status FROM approvals WHERE id = ?",
                                                              (held.id,)).fetchone()[0]
            decided = await store.decide(held.id, APPROVED, BOB, None, 1001, before_commit=audit)
            seen["after"] = (await store.get(held.id)).status
            return decided
        finally:
            store.close()

    assert asyncio.run(main()).status == APPROVED
    assert seen == {"on_loop": True, "visible_meanwhile": PENDING, "after": APPROVED}


# ---- a store that cannot answer ----------------------------------------------------------------------------
def test_a_store_locked_by_another_process_fails_after_the_busy_timeout_and_the_loop_keeps_turning(path):
    SqliteApprovalStore(path).close()

    async def main():
        store = ThreadedApprovalStore(path, busy_timeout=0.5)
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        ticking = asyncio.create_task(ticker())
        try:
            held, _ = await store.hold(candidate(), "f0", 1000)
            with StoreLocker(path):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="database is locked"):
                    await store.hold(candidate("k2"), "f1", 1000)
                waited = time.monotonic() - started
                with pytest.raises(StoreUnavailable):
                    await store.decide(held.id, APPROVED, BOB, None, 1001)
                assert (await store.get(held.id)).status == PENDING  # reads still work (WAL)
            assert (await store.decide(held.id, APPROVED, BOB, None, 1001)).status == APPROVED  # back
        finally:
            stop.set()
            await ticking
            store.close()
        return waited, max(gaps)

    waited, longest_gap = asyncio.run(main())
    assert 0.4 <= waited < 2.0
    assert longest_gap < 0.2  # the loop never waited on SQLite


def test_a_caller_that_stopped_waiting_leaves_nothing_decided(path):
    """The call's deadline passes while the store thread still waits for the lock: when the thread gets
    it, the decision's audit step refuses to run, so the decision is rolled back, not taken unseen."""
    SqliteApprovalStore(path).close()
    ran = []

    async def main():
        store = ThreadedApprovalStore(path, busy_timeout=3.0, call_timeout=0.3)
        try:
            held, _ = await store.hold(candidate(), "f1", 1000)
            with StoreLocker(path) as locker:
                with pytest.raises(StoreUnavailable, match="did not answer"):
                    await store.decide(held.id, APPROVED, BOB, None, 1001, before_commit=ran.append)
                locker.release()
            await asyncio.sleep(0.5)  # the store thread gets the lock now, and rolls back
            return await store.get(held.id)
        finally:
            store.close()

    assert asyncio.run(main()).status == PENDING and ran == []


def test_a_removed_or_replaced_store_file_is_unavailable_not_silently_new(store, path):
    store.hold(candidate(), "f1", 1000)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.remove(f"{path}{suffix}")
    with pytest.raises(StoreUnavailable, match="removed or replaced"):
        store.list()
    SqliteApprovalStore(path).close()  # someone puts an empty one in its place
    with pytest.raises(StoreUnavailable, match="removed or replaced"):
        store.hold(candidate("k2"), "f2", 1000)


def test_a_corrupt_store_cannot_be_opened(path):
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match="cannot be opened"):
        SqliteApprovalStore(path)
    threaded = ThreadedApprovalStore(path)
    try:
        with pytest.raises(StoreUnavailable):
            threaded.open_now()
        with pytest.raises(StoreUnavailable):
            asyncio.run(threaded.list())
    finally:
        threaded.close()


def test_a_store_on_a_full_disk_is_unavailable(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        store = SqliteApprovalStore(disk / "approvals.sqlite3")
        try:
            held, _ = store.hold(candidate(), "f0", 1000)
            filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # the rest of the disk
            try:
                while os.write(filler, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(filler)
            with pytest.raises(StoreUnavailable, match="full"):
                for i in range(1000):  # until the WAL needs a page it cannot get
                    store.hold(candidate(f"k{i}"), f"f{i}", 1000)
            os.remove(disk / "filler")  # room again: the store works on, the failed holds left nothing
            assert store.get(held.id).status == PENDING
        finally:
            store.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
