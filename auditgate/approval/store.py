"""Where held requests and their approvals live: a small interface, SQLite behind it (no mitmproxy), and the
threaded wrapper the gateway calls every store through (PostgreSQL: auditgate.approval.postgres).

Each call is one short transaction, and `hold` is atomic (a retry and its original never both create one).
Several gateway instances may share one store: a pending approval belongs to the process holding its flow
(its `holder`: the instance id plus a token of that run), which keeps a lease in the store by heartbeat;
another instance closes it only once that lease has lapsed (`expire_orphans`).

`SqliteApprovalStore` is plain blocking code; the gateway reaches it only through `ThreadedApprovalStore`,
which runs every call on one thread of its own (the connection lives there), so a store that is locked by
another process, slow or broken never holds up the proxy's event loop. Whatever goes wrong underneath
(locked past the busy timeout, the file gone, corrupt, a full disk) comes out as `StoreUnavailable`.

The file holds names and masked prompt previews: it, its `-wal` and `-shm` files are 0600 and the directories
the store creates 0700, whatever the umask. Its schema is versioned (`PRAGMA user_version`): an older store
is upgraded in place when opened, and one written by a newer gateway is refused rather than misread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from auditgate.approval.rules import (
    DecisionRefused,
    decisions_open_to,
    principal_of,
    visible_name,
)
from auditgate.core.private_files import PRIVATE_FILE, open_private_fd, private_dir

logger = logging.getLogger("auditgate.approval.store")

STORE_FILE = "approvals.sqlite3"
PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"
DEFAULT_BUSY_TIMEOUT_S = 2.0
TOO_LATE = "not decided before it expired"
LOOP_STEP_TIMEOUT_S = 30.0


def new_approval_id() -> str:
    return "apr_" + secrets.token_hex(5)


class StoreUnavailable(RuntimeError):
    """The approvals store could not answer: locked past its busy timeout, gone, corrupt, full, or too slow.

    Whoever asked must refuse what it was about to do (never go on as if approved)."""


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
    # The requester's stable subject (auditgate.approval.rules.principal_of), kept in a column of its own so
    # that the admin API lists a caller's own requests in SQL. None: an identity without one (older rows).
    requester_principal: str | None = None
    # The gateway process holding the request (instance id and a token of that run): its lease keeps the
    # approval pending (see ApprovalStore.heartbeat). Empty: the instance itself (older rows, tests).
    holder: str = ""

    def __post_init__(self) -> None:
        if self.requester_principal is None:
            self.requester_principal = principal_of(self.requester)
        if not self.holder:
            self.holder = self.instance

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Viewer:
    """Whom a listing is for: their own requests (by principal) and those their groups may decide."""

    principal: str | None
    groups: tuple[str, ...] = ()

    @classmethod
    def of(cls, identity: dict) -> "Viewer":
        return cls(principal_of(identity), tuple(g for g in identity.get("groups") or () if isinstance(g, str)))


@dataclass(frozen=True)
class DecisionTooLate(DecisionRefused):
    """A decision asked for after the approval's expiry: refused, and the approval closed as expired by that
    very call (`approval` is the row as it now stands, for the audit log)."""

    approval: Approval | None = None


# Called inside the store's transaction, on the store's thread, before the change is committed: raising
# rolls the change back (a decision that cannot be audited must not stand).
BeforeCommit = Callable[[Approval], None]


class ApprovalStore(Protocol):
    def hold(self, candidate: Approval, flow_id: str, now: float,
             on_create: BeforeCommit | None = None) -> tuple[Approval, str]:
        """Attach flow_id to the approval for candidate.key, or create candidate. Returns (approval, how):
        "created"; "attached" (a pending one, or an approved one no flow has used yet: an SDK retry after
        its original gave up); "reused" (approved, used, and still within its reuse window). `on_create`
        runs before a new approval is committed."""

    def get(self, approval_id: str) -> Approval | None: ...

    def list(self, status: str | None = None, limit: int = 200, viewer: Viewer | None = None) -> list[Approval]:
        """Newest first; with a viewer, only the approvals auditgate.approval.rules.may_see shows them."""

    def decide(self, approval_id: str, status: str, by: dict | None, reason: str | None, now: float | None = None,
               before_commit: BeforeCommit | None = None) -> Approval:
        """pending → approved / denied / expired; DecisionRefused (409) when it is no longer pending, and
        DecisionTooLate (409 approval_expired) when approved / denied at or after its expiry, which closes
        it as expired instead: the expiry is compared in the same conditional UPDATE. `now` None: the time
        at which the store takes the write lock."""

    def add_refusal(self, approval_id: str, refusal: dict) -> None: ...

    def claim(self, approval_id: str, flow_id: str, now: float) -> bool:
        """Whether flow_id may go upstream on this approval: it is approved, and no other flow has used it
        (or the reuse window is open). Recorded atomically, so one approval sends one request."""

    def cancel_abandoned(self, approval_id: str, flows_seen: int, now: float, reason: str) -> Approval | None:
        """Close a pending approval as expired because its callers went away, unless another flow attached
        since (its flows are no longer `flows_seen`). The closed approval, or None."""

    def expire_overdue(self, now: float) -> list[Approval]:
        """Close as expired every pending approval past its expiry; returns those this call closed."""

    def heartbeat(self, holder: str, instance: str, now: float, lease_s: float) -> None:
        """Renew (or take) holder's lease until now + lease_s: its pending approvals are not orphans meanwhile."""

    def release(self, holder: str) -> None:
        """End holder's lease now (a gateway stopping): its pending approvals are orphans at once."""

    def instances(self, now: float) -> list[dict]:
        """The processes with a lease: holder, instance, started_at, heartbeat_at, lease_until, live."""

    def expire_orphans(self, live_holder: str, now: float) -> list[Approval]:
        """Close as expired the pending approvals whose holder is not live_holder and has no lease running at
        now (its process stopped or died: its held flows are gone too). Returns those this call closed."""

    def close(self) -> None: ...


ORPHANED = "the gateway holding the request stopped; the request is gone"


_COLUMNS = ("id", "key", "rule", "requester", "approver_groups", "created_at", "expires_at", "reuse_seconds", "status",
            "model", "method", "host", "path", "body_sha256", "preview", "tools", "instance", "flows", "forwarded",
            "decided_at", "decided_by", "reason", "refusals", "requester_principal", "holder")
_JSON = {"requester", "approver_groups", "tools", "flows", "forwarded", "decided_by", "refusals"}
_LISTS = ("tools", "flows", "forwarded", "refusals", "approver_groups")  # a row may hold NULL: an empty list


def attach_or_reuse(approval: Approval, now: float) -> str | None:
    """How an identical request arriving at now goes with an earlier approval: "attached" to it (still pending,
    or approved after its original flow gave up: the SDK's retry takes it), "reused" (approved, inside its reuse
    window), or None (it needs an approval of its own)."""
    if approval.status == PENDING and approval.expires_at > now:
        return "attached"
    if approval.status == APPROVED and not approval.forwarded and approval.expires_at > now:
        return "attached"
    if approval.status == APPROVED and approval.decided_at and now < approval.decided_at + approval.reuse_seconds:
        return "reused"
    return None


def approval_from_row(values: tuple, decode_json: Callable[[object], object] | None = None) -> Approval:
    """The Approval a row of _COLUMNS holds, in any store. decode_json turns a JSON column's stored value back
    into its Python value (SQLite keeps text; PostgreSQL's jsonb comes back decoded: None)."""
    data = dict(zip(_COLUMNS, values))
    if decode_json is not None:
        for key in _JSON:
            data[key] = decode_json(data[key]) if data[key] is not None else None
    for key in _LISTS:
        data[key] = data[key] or []
    return Approval(**data)


def approval_row(approval: Approval, encode_json: Callable[[object], object]) -> tuple:
    """The values of _COLUMNS for an approval, its JSON columns as encode_json makes them for the store."""
    data = approval.as_dict()
    return tuple(encode_json(data[c]) if c in _JSON else data[c] for c in _COLUMNS)

# Version 0: the table as first shipped. Each later version is one step of _upgrade, in order.
# 1: requester_principal (the requester's stable subject), backfilled from requester
# 2: holder (the process holding a pending approval, backfilled from instance) and the instances' leases
SCHEMA_VERSION = 2
_CREATE = (
    """CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, rule TEXT NOT NULL, requester TEXT NOT NULL,
    approver_groups TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, reuse_seconds REAL NOT NULL,
    status TEXT NOT NULL, model TEXT, method TEXT, host TEXT, path TEXT, body_sha256 TEXT, preview TEXT, tools TEXT,
    instance TEXT, flows TEXT, forwarded TEXT, decided_at REAL, decided_by TEXT, reason TEXT, refusals TEXT
)""",
    "CREATE INDEX IF NOT EXISTS approvals_by_key ON approvals (key, created_at)",
    "CREATE INDEX IF NOT EXISTS approvals_by_status ON approvals (status, created_at)",
)
# What a viewer may see (auditgate.approval.rules.may_see), in SQL: their own (the same principal), or a rule
# whose approver groups meet theirs. Parameters: the viewer's principal, their groups as a JSON list.
_VISIBLE = ("((requester_principal IS NOT NULL AND requester_principal = ?) OR EXISTS ("
            "SELECT 1 FROM json_each(approvals.approver_groups) AS rule_group "
            "WHERE rule_group.value IN (SELECT value FROM json_each(?))))")
SIDE_FILES = ("-wal", "-shm", "-journal")


def _private_store_file(path: Path) -> None:
    """Create the store file as 0600 before SQLite opens it, and make an existing one (and the side files an
    earlier run left) 0600. SQLite gives the -wal and -shm files it creates the database file's mode, past the
    umask: they are private from their first byte."""
    os.close(open_private_fd(path, os.O_RDWR | os.O_CREAT))
    for suffix in SIDE_FILES:
        try:
            os.chmod(f"{path}{suffix}", PRIVATE_FILE)
        except FileNotFoundError:
            pass


def _unavailable(method):
    """sqlite3 and OS errors of a store call → StoreUnavailable (with the cause kept for the log)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable(f"the approvals store {self.path} is unavailable: {type(e).__name__}: {e}") from e
    return call


class SqliteApprovalStore:
    """Approvals in one SQLite file (WAL). Blocking: the gateway calls it only from its store thread
    (ThreadedApprovalStore); a lock keeps it safe to share between threads all the same."""

    def __init__(self, path: Path, busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = path
        try:
            private_dir(path.parent)
            _private_store_file(path)
            # timeout: how long a statement waits for another connection's (another process's) lock
            # before failing with "database is locked" (SQLite's busy timeout).
            self._db = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False, isolation_level=None)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL: a commit does not wait for fsync (a power cut may lose the last decisions,
                # never corrupt the file).
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._upgrade_schema()
                self._file = self._identity()
            except BaseException:
                self._db.close()
                raise
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable(f"the approvals store {path} cannot be opened: {type(e).__name__}: {e}") from e
        self._lock = threading.Lock()

    def _schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _upgrade_schema(self) -> None:
        """Create the table, or bring an older store up to SCHEMA_VERSION, in one write transaction (two
        processes opening an old store at once: the second finds it upgraded). A store of a newer version is
        refused: this gateway would not know what its columns mean."""
        version = self._schema_version()  # a read: a store already current is opened without the write lock
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(f"the approvals store {self.path} has schema version {version}, newer than this "
                                   f"gateway's ({SCHEMA_VERSION}); run the newer gateway, or move the file away")
        if version < SCHEMA_VERSION:
            self._transaction(self._upgrade)

    def _upgrade(self) -> None:
        version = self._schema_version()
        if version >= SCHEMA_VERSION:
            return
        for statement in _CREATE:
            self._db.execute(statement)
        if version < 1:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(approvals)")}
            if "requester_principal" not in columns:
                self._db.execute("ALTER TABLE approvals ADD COLUMN requester_principal TEXT")
            rows = self._db.execute("SELECT id, requester FROM approvals WHERE requester_principal IS NULL").fetchall()
            for approval_id, requester in rows:
                try:
                    principal = principal_of(json.loads(requester))
                except (TypeError, ValueError, AttributeError):
                    principal = None  # an unreadable requester is nobody's own request (approvers still see it)
                if principal is not None:
                    self._db.execute("UPDATE approvals SET requester_principal = ? WHERE id = ?",
                                     (principal, approval_id))
            self._db.execute("CREATE INDEX IF NOT EXISTS approvals_by_requester "
                             "ON approvals (requester_principal, created_at)")
        if version < 2:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(approvals)")}
            if "holder" not in columns:
                self._db.execute("ALTER TABLE approvals ADD COLUMN holder TEXT")
            self._db.execute("UPDATE approvals SET holder = coalesce(instance, '') WHERE holder IS NULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS instance_leases (holder TEXT PRIMARY KEY, "
                             "instance TEXT NOT NULL, started_at REAL NOT NULL, heartbeat_at REAL NOT NULL, "
                             "lease_until REAL NOT NULL)")
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")

    def _identity(self) -> tuple[int, int]:
        stat = os.stat(self.path)
        return stat.st_dev, stat.st_ino

    def _check_file(self) -> None:
        """SQLite would go on writing into a file that was deleted or replaced (its open handle): the
        approvals would then live nowhere anyone can see. Refuse instead, until the gateway is restarted."""
        try:
            same = self._identity() == self._file
        except FileNotFoundError:
            same = False
        if not same:
            raise StoreUnavailable(f"the approvals store {self.path} was removed or replaced while in use; "
                                   "restore it or restart the gateway")

    # ---- rows ---------------------------------------------------------------------------------------
    @staticmethod
    def _row(values: tuple) -> Approval:
        return approval_from_row(values, json.loads)

    @staticmethod
    def _values(approval: Approval) -> tuple:
        return approval_row(approval, json.dumps)

    def _select(self, where: str, args: tuple) -> list[Approval]:
        cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM approvals WHERE {where}", args)
        return [self._row(r) for r in cursor.fetchall()]

    def _one(self, approval_id: str) -> Approval | None:
        found = self._select("id = ?", (approval_id,))
        return found[0] if found else None

    def _update(self, approval: Approval) -> None:
        sets = ", ".join(f"{c} = ?" for c in _COLUMNS[1:])
        self._db.execute(f"UPDATE approvals SET {sets} WHERE id = ?", (*self._values(approval)[1:], approval.id))

    def _transaction(self, work):
        """Run work() inside BEGIN IMMEDIATE ... COMMIT (rolled back if it raises)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    # ---- the interface ----------------------------------------------------------------------------------
    @_unavailable
    def hold(self, candidate: Approval, flow_id: str, now: float,
             on_create: BeforeCommit | None = None) -> tuple[Approval, str]:
        with self._lock:
            self._check_file()
            return self._transaction(lambda: self._hold(candidate, flow_id, now, on_create))

    def _hold(self, candidate: Approval, flow_id: str, now: float,
              on_create: BeforeCommit | None) -> tuple[Approval, str]:
        recent = self._select("key = ? AND rule = ? ORDER BY created_at DESC LIMIT 5", (candidate.key, candidate.rule))
        for approval in recent:
            how = attach_or_reuse(approval, now)
            if how:
                approval.flows.append(flow_id)
                self._update(approval)
                return approval, how
        candidate.flows = [flow_id]
        self._db.execute(f"INSERT INTO approvals ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                         self._values(candidate))
        if on_create is not None:
            on_create(candidate)
        return candidate, "created"

    @_unavailable
    def get(self, approval_id: str) -> Approval | None:
        with self._lock:
            self._check_file()
            return self._one(approval_id)

    @_unavailable
    def list(self, status: str | None = None, limit: int = 200, viewer: Viewer | None = None) -> list[Approval]:
        where, args = ["1"], []
        if status:
            where.append("status = ?")
            args.append(status)
        if viewer is not None:
            where.append(_VISIBLE)
            args += [viewer.principal, json.dumps(list(viewer.groups))]
        with self._lock:
            self._check_file()
            return self._select(f"{' AND '.join(where)} ORDER BY created_at DESC LIMIT ?", (*args, limit))

    @_unavailable
    def decide(self, approval_id: str, status: str, by: dict | None, reason: str | None, now: float | None = None,
               before_commit: BeforeCommit | None = None) -> Approval:
        assert status in (APPROVED, DENIED, EXPIRED)
        with self._lock:
            self._check_file()
            found = self._one(approval_id)
            if found is None:
                raise DecisionRefused(404, "not_found", f"no approval {approval_id!r}")
            if found.status != PENDING:
                raise DecisionRefused(409, "already_decided", f"this request is no longer pending (it is {found.status})")
            return self._transaction(lambda: self._decide(approval_id, status, by, reason, now, before_commit))

    def _decide(self, approval_id: str, status: str, by: dict | None, reason: str | None, now: float | None,
                before_commit: BeforeCommit | None) -> Approval:
        if now is None:
            # The clock is read once the write lock is held, not when the decision was asked for: a decision
            # that waited for the lock past the expiry is a decision after the expiry.
            now = time.time()
        # One conditional UPDATE: only a still-pending row changes (two deciders racing cannot both win), and
        # an approval or a denial only before the expiry (a decision at or after it never stands).
        cursor = self._db.execute(
            "UPDATE approvals SET status = ?, decided_at = ?, decided_by = ?, reason = ? "
            "WHERE id = ? AND status = ? AND (? OR expires_at > ?)",
            (status, now, json.dumps(by), reason, approval_id, PENDING, status == EXPIRED, now))
        if cursor.rowcount == 1:
            decided = self._one(approval_id)
            if before_commit is not None:
                before_commit(decided)
            return decided
        current = self._one(approval_id)
        if current is None or current.status != PENDING:
            raise DecisionRefused(409, "already_decided", "this request was decided a moment ago")
        # Still pending but past its expiry (nobody closed it yet): it is closed now, and the decision refused.
        self._db.execute("UPDATE approvals SET status = ?, decided_at = ?, reason = ? WHERE id = ? AND status = ?",
                         (EXPIRED, now, TOO_LATE, approval_id, PENDING))
        self._db.execute("COMMIT")
        raise DecisionTooLate(409, "approval_expired",
                              f"this request expired {now - current.expires_at:.1f}s before the decision; "
                              "it can no longer be approved or denied", self._one(approval_id))

    @_unavailable
    def add_refusal(self, approval_id: str, refusal: dict) -> None:
        with self._lock:
            self._check_file()
            # Appended in one statement: two refusals at once both stay.
            self._db.execute("UPDATE approvals SET refusals = json_insert(coalesce(refusals, '[]'), '$[#]', json(?)) "
                             "WHERE id = ?", (json.dumps(refusal), approval_id))

    @_unavailable
    def claim(self, approval_id: str, flow_id: str, now: float) -> bool:
        with self._lock:
            self._check_file()

            def work() -> bool:
                approval = self._one(approval_id)
                ok = approval is not None and approval.status == APPROVED and (
                    not approval.forwarded or flow_id in approval.forwarded
                    or (approval.decided_at is not None and now < approval.decided_at + approval.reuse_seconds))
                if ok and flow_id not in approval.forwarded:
                    approval.forwarded.append(flow_id)
                    self._db.execute("UPDATE approvals SET forwarded = ? WHERE id = ?",
                                     (json.dumps(approval.forwarded), approval_id))
                return ok
            return self._transaction(work)

    @_unavailable
    def cancel_abandoned(self, approval_id: str, flows_seen: int, now: float, reason: str) -> Approval | None:
        with self._lock:
            self._check_file()
            cursor = self._db.execute(
                "UPDATE approvals SET status = ?, decided_at = ?, reason = ? "
                "WHERE id = ? AND status = ? AND json_array_length(flows) = ?",
                (EXPIRED, now, reason, approval_id, PENDING, flows_seen))
            return self._one(approval_id) if cursor.rowcount == 1 else None

    @_unavailable
    def expire_overdue(self, now: float) -> list[Approval]:
        with self._lock:
            self._check_file()
            # A read first: in WAL mode it needs no lock, so an idle store is never write-locked by the sweep.
            if not self._db.execute("SELECT 1 FROM approvals WHERE status = ? AND expires_at <= ? LIMIT 1",
                                    (PENDING, now)).fetchone():
                return []
            cursor = self._db.execute(
                f"UPDATE approvals SET status = ?, decided_at = ?, reason = ? WHERE status = ? AND expires_at <= ? "
                f"RETURNING {', '.join(_COLUMNS)}", (EXPIRED, now, "not decided in time", PENDING, now))
            return [self._row(r) for r in cursor.fetchall()]

    @_unavailable
    def heartbeat(self, holder: str, instance: str, now: float, lease_s: float) -> None:
        with self._lock:
            self._check_file()
            self._db.execute(
                "INSERT INTO instance_leases (holder, instance, started_at, heartbeat_at, lease_until) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (holder) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, "
                "lease_until = excluded.lease_until", (holder, instance, now, now, now + lease_s))

    @_unavailable
    def release(self, holder: str) -> None:
        with self._lock:
            self._check_file()
            self._db.execute("DELETE FROM instance_leases WHERE holder = ?", (holder,))

    @_unavailable
    def instances(self, now: float) -> list[dict]:
        with self._lock:
            self._check_file()
            rows = self._db.execute("SELECT holder, instance, started_at, heartbeat_at, lease_until "
                                    "FROM instance_leases ORDER BY instance, started_at").fetchall()
        return [{"holder": r[0], "instance": r[1], "started_at": r[2], "heartbeat_at": r[3], "lease_until": r[4],
                 "live": r[4] > now} for r in rows]

    @_unavailable
    def expire_orphans(self, live_holder: str, now: float) -> list[Approval]:
        with self._lock:
            self._check_file()
            orphaned = ("status = ? AND holder != ? AND NOT EXISTS (SELECT 1 FROM instance_leases AS lease "
                        "WHERE lease.holder = approvals.holder AND lease.lease_until > ?)")
            # A read first, as expire_overdue: the usual answer (no orphans) takes no write lock.
            if not self._db.execute(f"SELECT 1 FROM approvals WHERE {orphaned} LIMIT 1",
                                    (PENDING, live_holder, now)).fetchone():
                return []
            cursor = self._db.execute(
                f"UPDATE approvals SET status = ?, decided_at = ?, reason = ? WHERE {orphaned} "
                f"RETURNING {', '.join(_COLUMNS)}", (EXPIRED, now, ORPHANED, PENDING, live_holder, now))
            return [self._row(r) for r in cursor.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class _LoopStep:
    """A callback of the event loop's to run inside a store transaction, and whether the caller still waits."""

    callback: Callable[[Approval], None]
    gave_up: bool = False  # the caller's deadline passed: the step refuses to run (the transaction rolls back)
    ran: bool = False  # the callback ran (its audit entry is written): the commit must be waited for


def _outcome_nobody_awaits(future: asyncio.Future) -> None:
    """A call whose caller stopped waiting finishes later: take its outcome (a rolled-back step's error
    included) so that asyncio does not report it as never retrieved."""
    if not future.cancelled() and future.exception() is not None:
        logger.debug("approvals store: a call that had timed out ended with %s", future.exception())


class ThreadedApprovalStore:
    """The same interface, awaitable: each call runs on one thread of its own that owns the store's connection
    (SQLite, or PostgreSQL's pool: `opener` makes the blocking store on that thread).

    The event loop never waits on SQLite: a store locked by another process costs the call that needs it
    up to the busy timeout, on the store thread, and that call then fails with StoreUnavailable. Each call
    also has a deadline (a queue behind a slow call, a hung disk) and the queue a bound: past either, the
    call fails with StoreUnavailable rather than waiting.

    `hold(on_create=)` and `decide(before_commit=)` take callbacks of the event loop (the audit log's):
    each runs on the loop while the store thread holds the transaction open, so the change is committed
    only if it returned, and never once the caller has stopped waiting.
    """

    MAX_QUEUED = 64

    def __init__(self, path: Path | None = None, busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
                 call_timeout: float | None = None, *, opener: Callable[[], ApprovalStore] | None = None,
                 description: str | None = None, listener: Callable[[Callable[[str | None], None]], object] | None
                 = None) -> None:
        """path: a SQLite file; or opener (a blocking store, made on the store thread) and its description
        (for messages: never a password). listener(on_change) starts pushing changed approval ids (None: any
        may have changed) from another thread, and returns an object with stop(); None: the store cannot."""
        if opener is None:
            assert path is not None
            opener = functools.partial(SqliteApprovalStore, path, busy_timeout)
        self.path = path
        self.description = description or f"the approvals store {path}"
        self._opener = opener
        self._listener_factory = listener
        self._listener = None
        self.busy_timeout = busy_timeout
        # Room for one call queued behind another that waits out its busy timeout.
        self.call_timeout = call_timeout if call_timeout is not None else 2 * busy_timeout + 1.0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="approvals-store")
        self._store: SqliteApprovalStore | None = None
        self._queued = 0
        self._closed = False

    # ---- on the store thread --------------------------------------------------------------------------
    def _open(self) -> None:
        if self._store is None:
            self._store = self._opener()

    def _run(self, name: str, args: tuple):
        self._open()
        return getattr(self._store, name)(*args)

    def _release_quietly(self, holder: str) -> None:
        try:
            self._run("release", (holder,))
        except StoreUnavailable as e:  # its lease then lapses on its own; its approvals are closed after it
            logger.warning("approvals store: the lease of %s could not be ended: %s", holder, e)

    def _close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @staticmethod
    def _on_loop(loop: asyncio.AbstractEventLoop, step: _LoopStep | None) -> BeforeCommit | None:
        """The store thread's side of a loop step: run it on the loop and wait; its exception rolls back."""
        if step is None:
            return None

        def run(approval: Approval) -> None:
            done: concurrent.futures.Future = concurrent.futures.Future()

            def on_loop() -> None:
                if not done.set_running_or_notify_cancel():
                    return
                try:
                    if step.gave_up:
                        raise StoreUnavailable("the approvals store answered too late; nothing was changed")
                    step.callback(approval)
                    step.ran = True
                    done.set_result(None)
                except BaseException as e:  # handed to the store thread, which rolls back
                    done.set_exception(e)
            loop.call_soon_threadsafe(on_loop)
            try:
                done.result(timeout=LOOP_STEP_TIMEOUT_S)  # the loop never waits on the store: it gets to it soon
            except concurrent.futures.TimeoutError:
                if done.cancel():  # not started (a loop shutting down, say): it never will be; roll back
                    raise StoreUnavailable("the event loop did not take the store's callback") from None
                done.result()  # it ran or is running: its outcome decides
        return run

    # ---- from anywhere ------------------------------------------------------------------------------------
    def open_now(self) -> None:
        """Open the file (and make its table) now, waiting for it: for the gateway's start, where a store
        that cannot be opened stops the start. StoreUnavailable if it cannot."""
        future = self._executor.submit(self._open)
        try:
            future.result(timeout=self.call_timeout)
        except concurrent.futures.TimeoutError:
            raise StoreUnavailable(f"{self.description} did not open within {self.call_timeout:g}s") from None

    @property
    def pushes_changes(self) -> bool:
        """Whether the store tells of decisions made elsewhere as they are committed (PostgreSQL's NOTIFY)."""
        return self._listener_factory is not None

    def listen(self, on_change: Callable[[str | None], None]) -> None:
        """Call on_change(approval_id) on the event loop for each approval another process changed (None: any
        may have, e.g. after the notification connection was lost). Nothing for a store that cannot tell."""
        if self._listener_factory is None or self._listener is not None:
            return
        loop = asyncio.get_running_loop()

        def from_thread(approval_id: str | None) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_change, approval_id)
        self._listener = self._listener_factory(from_thread)

    def close(self, release_holder: str | None = None) -> None:
        """Close the connection on its thread once the calls already queued are done; returns at once.
        release_holder: end that holder's lease first (a gateway stopping: its held requests are gone)."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if not self._closed:
            self._closed = True
            if release_holder is not None:
                self._executor.submit(self._release_quietly, release_holder)
            self._executor.submit(self._close)
            self._executor.shutdown(wait=False)

    @property
    def queued(self) -> int:
        """Calls sent to the store thread and not answered yet."""
        return self._queued

    async def _call(self, name: str, *args, step: _LoopStep | None = None):
        if self._closed:
            raise StoreUnavailable("the approvals store is closed")
        if self._queued >= self.MAX_QUEUED:
            raise StoreUnavailable(f"the approvals store is not keeping up ({self._queued} calls waiting)")
        loop = asyncio.get_running_loop()
        if step is not None:
            args = (*args, self._on_loop(loop, step))
        self._queued += 1
        try:
            future = loop.run_in_executor(self._executor, self._run, name, args)
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.call_timeout)
            except TimeoutError:
                if step is None or not step.ran:
                    if step is not None:
                        step.gave_up = True  # on the loop, like the step itself: it cannot run after this
                    future.add_done_callback(_outcome_nobody_awaits)
                    raise StoreUnavailable(f"the approvals store did not answer within {self.call_timeout:g}s") from None
            # The step ran (an audit entry says what changed): the commit is all that is left; wait for it.
            try:
                return await asyncio.wait_for(future, self.call_timeout)
            except TimeoutError:
                raise StoreUnavailable("the approvals store did not finish committing a change whose audit entry "
                                       "is written") from None
        finally:
            self._queued -= 1

    async def hold(self, candidate: Approval, flow_id: str, now: float,
                   on_create: Callable[[Approval], None] | None = None) -> tuple[Approval, str]:
        """on_create: run on the loop before a new approval is committed (raising: nothing is held)."""
        return await self._call("hold", candidate, flow_id, now, step=_LoopStep(on_create) if on_create else None)

    async def get(self, approval_id: str) -> Approval | None:
        return await self._call("get", approval_id)

    async def list(self, status: str | None = None, limit: int = 200, viewer: Viewer | None = None) -> list[Approval]:
        return await self._call("list", status, limit, viewer)

    async def decide(self, approval_id: str, status: str, by: dict | None, reason: str | None, now: float | None,
                     before_commit: Callable[[Approval], None] | None = None) -> Approval:
        """before_commit: run on the loop before the decision is committed (raising: it does not stand)."""
        return await self._call("decide", approval_id, status, by, reason, now,
                                step=_LoopStep(before_commit) if before_commit else None)

    async def add_refusal(self, approval_id: str, refusal: dict) -> None:
        return await self._call("add_refusal", approval_id, refusal)

    async def claim(self, approval_id: str, flow_id: str, now: float) -> bool:
        return await self._call("claim", approval_id, flow_id, now)

    async def cancel_abandoned(self, approval_id: str, flows_seen: int, now: float, reason: str) -> Approval | None:
        return await self._call("cancel_abandoned", approval_id, flows_seen, now, reason)

    async def expire_overdue(self, now: float) -> list[Approval]:
        return await self._call("expire_overdue", now)

    async def heartbeat(self, holder: str, instance: str, now: float, lease_s: float) -> None:
        return await self._call("heartbeat", holder, instance, now, lease_s)

    async def release(self, holder: str) -> None:
        return await self._call("release", holder)

    async def instances(self, now: float) -> list[dict]:
        return await self._call("instances", now)

    async def expire_orphans(self, live_holder: str, now: float) -> list[Approval]:
        return await self._call("expire_orphans", live_holder, now)


def public_view(approval: Approval, now: float, viewer: dict | None = None) -> dict:
    """An approval as the API and the page show it to viewer (its de-dup key left out).

    Callers only ever get approvals `may_see` lets them see. An approver of the rule gets all of it; a
    requester seeing their own request (and not an approver of its rule) gets the decision and its reason,
    but of the people who decided or tried to, only the decider's name (which the refusal told them anyway).
    """
    data = approval.as_dict()
    data.pop("key", None)
    data["age_s"] = round(now - approval.created_at, 1)
    data["expires_in_s"] = round(max(0.0, approval.expires_at - now), 1) if approval.status == PENDING else 0
    data["requester_display"] = visible_name(approval.requester.get("name"))
    if viewer is not None:
        if not set(viewer.get("groups") or ()) & set(approval.approver_groups):
            data["decided_by"] = {"name": approval.decided_by.get("name")} if approval.decided_by else None
            data["refusals"] = [{k: r[k] for k in ("decision", "code", "at") if k in r} for r in approval.refusals]
            data.pop("instance", None)
            data.pop("holder", None)
        data["viewer_may"] = decisions_open_to(approval.requester, approval.approver_groups, approval.status, viewer)
    return data
