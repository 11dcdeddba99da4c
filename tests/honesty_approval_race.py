"""A process that decides approvals in a SQLite approval store shared with another process (for the race test).

Each process opens its own SqliteApprovalStore (its own connection, its own in-process lock) on the same
file, so nothing but SQLite itself stands between two deciders: what two gateway instances, or the
gateway and `auditgate approvals approve` racing it, would do.
"""

from __future__ import annotations

import time
from pathlib import Path

from auditgate.approval.rules import DecisionRefused
from auditgate.approval.store import SqliteApprovalStore


def decide_each(path: str, approval_ids: list[str], status: str, decider: dict, barrier, results, pause: float) -> None:
    """Decide every approval in turn, meeting the other process at `barrier` before each one.

    pause > 0 sleeps after every read of the store, so that both processes have read an approval as
    pending before either writes: the interleaving in which only the conditional UPDATE can stop a
    second decision.
    """
    store = SqliteApprovalStore(Path(path))
    if pause:
        select = store._select

        def slow_select(where, args):
            rows = select(where, args)
            time.sleep(pause)
            return rows

        store._select = slow_select
    outcomes = []
    try:
        for approval_id in approval_ids:
            barrier.wait(timeout=30)
            try:
                decided = store.decide(approval_id, status, decider, None, 1001.0)
                outcomes.append((approval_id, "won", decided.status))
            except DecisionRefused as refused:
                outcomes.append((approval_id, refused.code, refused.message))
    finally:
        store.close()
        results.put((status, outcomes))


def _sleep_until(moment: float) -> None:
    while (left := moment - time.time()) > 0:
        time.sleep(min(left, 0.01) if left > 0.002 else 0)


def approve_at_expiry(path: str, approval_ids: list[str], decider: dict, ready, barrier, results, pause: float,
                      jitter: float, seed: int) -> None:
    """Approve every approval at (about) the moment it expires, meeting the other process at `barrier`
    before each one; the gateway's way: `now` left to the store (the clock read once it holds the lock).

    pause > 0: read the approval (pending, not yet expired) pause/2 before its expiry, and write pause/2
    after it: the interleaving in which only the expiry compared inside the UPDATE refuses the approval.
    """
    import random

    rng = random.Random(seed)
    store = SqliteApprovalStore(Path(path))
    select, slow = store._select, [False]

    def select_then_pause(where, args):
        rows = select(where, args)
        if slow[0]:
            time.sleep(pause)
        return rows

    store._select = select_then_pause
    outcomes = []
    try:
        ready.wait(timeout=60)  # every process is up (the expiries are set then)
        ready.wait(timeout=60)  # go
        for approval_id in approval_ids:
            barrier.wait(timeout=30)
            expires_at = store.get(approval_id).expires_at
            _sleep_until(expires_at - pause / 2 + rng.uniform(-jitter, jitter))
            slow[0] = bool(pause)
            try:
                decided = store.decide(approval_id, "approved", decider, None)
                outcomes.append((approval_id, "won", decided.decided_at))
            except DecisionRefused as refused:
                outcomes.append((approval_id, refused.code, None))
            finally:
                slow[0] = False
    finally:
        store.close()
        results.put(("approver", outcomes))


def sweep_at_expiry(path: str, approval_ids: list[str], ready, barrier, results, delay: float) -> None:
    """Close overdue approvals `delay` after each one expires (the gateway's sweep), meeting the approver at
    `barrier` before each one."""
    store = SqliteApprovalStore(Path(path))
    outcomes = []
    try:
        ready.wait(timeout=60)  # every process is up (the expiries are set then)
        ready.wait(timeout=60)  # go
        for approval_id in approval_ids:
            barrier.wait(timeout=30)
            _sleep_until(store.get(approval_id).expires_at + delay)
            closed = store.expire_overdue(time.time())
            outcomes.append((approval_id, "won" if approval_id in {a.id for a in closed} else "lost", None))
    finally:
        store.close()
        results.put(("sweeper", outcomes))
