"""Where held requests and their approvals live: a small interface, and SQLite behind it (no mitmproxy).

The interface is what a PostgreSQL store would implement for several gateway instances sharing approvals;
each call is one short transaction, and `hold` is atomic (a retry and its original never both create one).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from auditgate.approval.rules import DecisionRefused

STORE_FILE = "approvals.sqlite3"
PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"


def new_approval_id() -> str:
    return "apr_" + secrets.token_hex(5)


@dataclass
class Approval:
    """One held request (and the retries attached to it): what approvers see and what the record keeps."""

    id: str
    key: str  # same caller + same request (method, upstream, path, body hash): see auditgate.approval.rules.request_key
    rule: str
    requester: dict  # the caller's identity metadata (name, groups, method, ...); never a credential
    approver_groups: list[str]
    created_at: float
    expires_at: float
    reuse_seconds: float = 0.0
    status: str = PENDING
    model: str | None = None
    method: str = ""
    host: str = ""
    path: str = ""
    body_sha256: str = ""
    preview: str = ""  # masked prompt text, for the approver
    tools: list[str] = field(default_factory=list)
    instance: str = ""  # the gateway instance holding the request
    flows: list[str] = field(default_factory=list)  # flow ids attached (the original and SDK retries)
    forwarded: list[str] = field(default_factory=list)  # flow ids that went upstream on this approval
    decided_at: float | None = None
    decided_by: dict | None = None
    reason: str | None = None
    refusals: list[dict] = field(default_factory=list)  # refused attempts to decide (self-approval, ...)

    def as_dict(self) -> dict:
        return asdict(self)


class ApprovalStore(Protocol):
    def hold(self, candidate: Approval, flow_id: str, now: float) -> tuple[Approval, str]:
        """Attach flow_id to the approval for candidate.key, or create candidate. Returns (approval, how):
        "created"; "attached" (a pending one, or an approved one no flow has used yet: an SDK retry after
        its original gave up); "reused" (approved, used, and still within its reuse window)."""

    def get(self, approval_id: str) -> Approval | None: ...

    def list(self, status: str | None = None, limit: int = 200) -> list[Approval]: ...

    def decide(self, approval_id: str, status: str, by: dict | None, reason: str | None, now: float) -> Approval:
        """pending → approved / denied / expired; DecisionRefused (409) when it is no longer pending."""

    def add_refusal(self, approval_id: str, refusal: dict) -> None: ...

    def claim(self, approval_id: str, flow_id: str, now: float) -> bool:
        """Whether flow_id may go upstream on this approval: it is approved, and no other flow has used it
        (or the reuse window is open). Recorded atomically, so one approval sends one request."""

    def expire_orphans(self, live_instance: str, now: float) -> int:
        """Close as expired the pending approvals of instances that are gone (their held flows are gone too)."""

    def close(self) -> None: ...


_COLUMNS = ("id", "key", "rule", "requester", "approver_groups", "created_at", "expires_at", "reuse_seconds", "status",
            "model", "method", "host", "path", "body_sha256", "preview", "tools", "instance", "flows", "forwarded",
            "decided_at", "decided_by", "reason", "refusals")
_JSON = {"requester", "approver_groups", "tools", "flows", "forwarded", "decided_by", "refusals"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, rule TEXT NOT NULL, requester TEXT NOT NULL,
    approver_groups TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, reuse_seconds REAL NOT NULL,
    status TEXT NOT NULL, model TEXT, method TEXT, host TEXT, path TEXT, body_sha256 TEXT, preview TEXT, tools TEXT,
    instance TEXT, flows TEXT, forwarded TEXT, decided_at REAL, decided_by TEXT, reason TEXT, refusals TEXT
);
CREATE INDEX IF NOT EXISTS approvals_by_key ON approvals (key, created_at);
CREATE INDEX IF NOT EXISTS approvals_by_status ON approvals (status, created_at);
"""


class SqliteApprovalStore:
    """Approvals in one SQLite file (WAL); safe to share between threads of one process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit does not wait for fsync (a power cut may lose the last decisions, never
        # corrupt the file): approvals are decided inside the event loop.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        path.chmod(0o600)

    # ---- rows ---------------------------------------------------------------------------------------
    @staticmethod
    def _row(values: tuple) -> Approval:
        data = dict(zip(_COLUMNS, values))
        for key in _JSON:
            data[key] = json.loads(data[key]) if data[key] is not None else None
        for key in ("tools", "flows", "forwarded", "refusals", "approver_groups"):
            data[key] = data[key] or []
        return Approval(**data)

    @staticmethod
    def _values(approval: Approval) -> tuple:
        data = approval.as_dict()
        return tuple(json.dumps(data[c]) if c in _JSON else data[c] for c in _COLUMNS)

    def _select(self, where: str, args: tuple) -> list[Approval]:
        cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM approvals WHERE {where}", args)
        return [self._row(r) for r in cursor.fetchall()]

    def _update(self, approval: Approval) -> None:
        sets = ", ".join(f"{c} = ?" for c in _COLUMNS[1:])
        self._db.execute(f"UPDATE approvals SET {sets} WHERE id = ?", (*self._values(approval)[1:], approval.id))

    # ---- the interface ----------------------------------------------------------------------------------
    def hold(self, candidate: Approval, flow_id: str, now: float) -> tuple[Approval, str]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = self._hold(candidate, flow_id, now)
                self._db.execute("COMMIT")
                return result
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _hold(self, candidate: Approval, flow_id: str, now: float) -> tuple[Approval, str]:
        recent = self._select("key = ? AND rule = ? ORDER BY created_at DESC LIMIT 5", (candidate.key, candidate.rule))
        for approval in recent:
            how = None
            if approval.status == PENDING and approval.expires_at > now:
                how = "attached"
            elif approval.status == APPROVED and not approval.forwarded and approval.expires_at > now:
                how = "attached"  # approved after its original flow gave up: the SDK's retry takes it
            elif approval.status == APPROVED and approval.decided_at and now < approval.decided_at + approval.reuse_seconds:
                how = "reused"
            if how:
                approval.flows.append(flow_id)
                self._update(approval)
                return approval, how
        candidate.flows = [flow_id]
        self._db.execute(f"INSERT INTO approvals ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                         self._values(candidate))
        return candidate, "created"

    def get(self, approval_id: str) -> Approval | None:
        with self._lock:
            found = self._select("id = ?", (approval_id,))
        return found[0] if found else None

    def list(self, status: str | None = None, limit: int = 200) -> list[Approval]:
        with self._lock:
            if status:
                return self._select("status = ? ORDER BY created_at DESC LIMIT ?", (status, limit))
            return self._select("1 ORDER BY created_at DESC LIMIT ?", (limit,))

    def decide(self, approval_id: str, status: str, by: dict | None, reason: str | None, now: float) -> Approval:
        assert status in (APPROVED, DENIED, EXPIRED)
        with self._lock:
            found = self._select("id = ?", (approval_id,))
            if not found:
                raise DecisionRefused(404, "not_found", f"no approval {approval_id!r}")
            approval = found[0]
            if approval.status != PENDING:
                raise DecisionRefused(409, "already_decided", f"this request is no longer pending (it is {approval.status})")
            approval.status, approval.decided_at, approval.decided_by, approval.reason = status, now, by, reason
            # Only a still-pending row changes: two deciders racing cannot both win.
            sets = "status = ?, decided_at = ?, decided_by = ?, reason = ?"
            cursor = self._db.execute(f"UPDATE approvals SET {sets} WHERE id = ? AND status = ?",
                                      (status, now, json.dumps(by), reason, approval_id, PENDING))
            if cursor.rowcount != 1:
                raise DecisionRefused(409, "already_decided", "this request was decided a moment ago")
            return approval

    def add_refusal(self, approval_id: str, refusal: dict) -> None:
        with self._lock:
            found = self._select("id = ?", (approval_id,))
            if found:
                found[0].refusals.append(refusal)
                self._db.execute("UPDATE approvals SET refusals = ? WHERE id = ?",
                                 (json.dumps(found[0].refusals), approval_id))

    def claim(self, approval_id: str, flow_id: str, now: float) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                found = self._select("id = ?", (approval_id,))
                approval = found[0] if found else None
                ok = approval is not None and approval.status == APPROVED and (
                    not approval.forwarded or flow_id in approval.forwarded
                    or (approval.decided_at is not None and now < approval.decided_at + approval.reuse_seconds))
                if ok and flow_id not in approval.forwarded:
                    approval.forwarded.append(flow_id)
                    self._db.execute("UPDATE approvals SET forwarded = ? WHERE id = ?",
                                     (json.dumps(approval.forwarded), approval_id))
                self._db.execute("COMMIT")
                return ok
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def expire_orphans(self, live_instance: str, now: float) -> int:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE approvals SET status = ?, decided_at = ?, reason = ? WHERE status = ? AND instance != ?",
                (EXPIRED, now, "the gateway holding the request stopped; the request is gone", PENDING, live_instance),
            )
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


def public_view(approval: Approval, now: float) -> dict:
    """An approval as the API and the page show it (its de-dup key left out)."""
    data = approval.as_dict()
    data.pop("key", None)
    data["age_s"] = round(now - approval.created_at, 1)
    data["expires_in_s"] = round(max(0.0, approval.expires_at - now), 1) if approval.status == PENDING else 0
    return data
