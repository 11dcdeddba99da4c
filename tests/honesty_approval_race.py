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
