"""The approvals store in PostgreSQL, for several gateway instances sharing approvals (no mitmproxy).

`PostgresApprovalStore` implements auditgate.approval.store's interface with the same semantics as the SQLite
store (the contract suite, tests/test_approval_store_contract.py, runs against both). It is blocking code on a
psycopg connection pool; the gateway reaches it only through `ThreadedApprovalStore`, so the event loop never
waits on the database. Every failure (server down, a statement past `statement_timeout`, a lock held past
`lock_timeout`, the pool empty past its wait) comes out as `StoreUnavailable`: the caller refuses (fail closed).

The schema is created and migrated by the gateway: `auditgate_schema` holds the version, and each step of
`MIGRATIONS` runs once, under a transaction-level advisory lock (two gateways starting at once: the second
finds the work done). A store written by a newer gateway is refused.

Decisions reach the instance holding the flow at once: each change of an approval's status sends
`NOTIFY auditgate_approvals, '<approval id>'` in its transaction (delivered at commit), and each gateway
LISTENs on a connection of its own (`ChangeListener`, on a thread).

The DSN (with its password) is a secret: it is never put in a message, a log line or a record; a store is
described by host, port and database only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from auditgate.approval.rules import DecisionRefused
from auditgate.approval.store import (
    _COLUMNS,
    APPROVED,
    DENIED,
    EXPIRED,
    ORPHANED,
    PENDING,
    TOO_LATE,
    Approval,
    BeforeCommit,
    DecisionTooLate,
    StoreUnavailable,
    Viewer,
    approval_from_row,
    approval_row,
    attach_or_reuse,
)

logger = logging.getLogger("auditgate.approval.postgres")

CHANNEL = "auditgate_approvals"
SCHEMA_VERSION = 1
_MIGRATION_LOCK = 0x61756469  # pg_advisory_xact_lock key of schema migrations ("audi")
_HOLD_LOCK = 0x686F6C64  # first half of the advisory lock serializing holds of one request key ("hold")

# Each step brings the schema from version i to i + 1; never edited once shipped, only appended to.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE approvals (
            id text PRIMARY KEY, key text NOT NULL, rule text NOT NULL, requester jsonb NOT NULL,
            approver_groups jsonb NOT NULL, created_at double precision NOT NULL,
            expires_at double precision NOT NULL, reuse_seconds double precision NOT NULL, status text NOT NULL,
            model text, method text, host text, path text, body_sha256 text, preview text,
            tools jsonb NOT NULL DEFAULT '[]', instance text, flows jsonb NOT NULL DEFAULT '[]',
            forwarded jsonb NOT NULL DEFAULT '[]', decided_at double precision, decided_by jsonb, reason text,
            refusals jsonb NOT NULL DEFAULT '[]', requester_principal text, holder text NOT NULL DEFAULT '')""",
        "CREATE INDEX approvals_by_key ON approvals (key, created_at)",
        "CREATE INDEX approvals_by_status ON approvals (status, created_at)",
        "CREATE INDEX approvals_by_requester ON approvals (requester_principal, created_at)",
        "CREATE INDEX approvals_pending_by_holder ON approvals (holder) WHERE status = 'pending'",
        """CREATE TABLE instance_leases (
            holder text PRIMARY KEY, instance text NOT NULL, started_at double precision NOT NULL,
            heartbeat_at double precision NOT NULL, lease_until double precision NOT NULL)""",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION

_SELECT = sql.SQL("SELECT {} FROM approvals").format(sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)))
_RETURNING = sql.SQL(" RETURNING {}").format(sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)))
_ORPHANED = ("status = %s AND holder <> %s AND NOT EXISTS (SELECT 1 FROM instance_leases AS lease "
             "WHERE lease.holder = approvals.holder AND lease.lease_until > %s)")


def describe_dsn(dsn: str) -> str:
    """A DSN as messages may show it: host, port and database, never the user's password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the PostgreSQL approvals store (its DSN could not be parsed)"
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    return f"the PostgreSQL approvals store {host}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"


def check_dsn(dsn: str) -> None:
    """ValueError (whose message never holds the DSN) unless libpq can parse it."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error:
        raise ValueError("the PostgreSQL DSN cannot be parsed (postgresql://USER:PASSWORD@HOST:PORT/DB)") from None


def _connect_kwargs(busy_timeout: float) -> dict:
    milliseconds = max(1, int(busy_timeout * 1000))
    # A statement or a lock wait past the busy timeout fails (→ StoreUnavailable), as SQLite's busy timeout.
    return {"autocommit": True, "connect_timeout": max(1, int(busy_timeout + 0.999)),
            "options": f"-c statement_timeout={milliseconds} -c lock_timeout={milliseconds}",
            "application_name": "auditgate"}


class PostgresApprovalStore:
    """Approvals in PostgreSQL. Blocking: the gateway calls it only from its store thread (ThreadedApprovalStore)."""

    def __init__(self, dsn: str, busy_timeout: float = 2.0) -> None:
        self.description = describe_dsn(dsn)
        self.busy_timeout = busy_timeout
        self._pool = psycopg_pool.ConnectionPool(
            dsn, min_size=1, max_size=2, open=False, kwargs=_connect_kwargs(busy_timeout),
            timeout=busy_timeout, check=psycopg_pool.ConnectionPool.check_connection, name="auditgate-approvals")
        try:
            self._pool.open(wait=True, timeout=max(busy_timeout, 1.0) + 1.0)
            self._migrate()
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as e:
            self._pool.close()
            raise StoreUnavailable(f"{self.description} cannot be opened: {type(e).__name__}: {e}") from e
        except BaseException:
            self._pool.close()
            raise

    # ---- schema -------------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS auditgate_schema (component text PRIMARY KEY, "
                         "version integer NOT NULL)")
            row = conn.execute("SELECT version FROM auditgate_schema WHERE component = 'approvals'").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise StoreUnavailable(f"{self.description} has schema version {version}, newer than this gateway's "
                                       f"({SCHEMA_VERSION}); run the newer gateway")
            for step in MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute("INSERT INTO auditgate_schema (component, version) VALUES ('approvals', %s) "
                             "ON CONFLICT (component) DO UPDATE SET version = excluded.version", (SCHEMA_VERSION,))
                logger.info("approvals: %s: schema migrated from version %d to %d", self.description, version,
                            SCHEMA_VERSION)

    def schema_version(self) -> int:
        with self._connection() as conn:
            row = conn.execute("SELECT version FROM auditgate_schema WHERE component = 'approvals'").fetchone()
            return row[0] if row else 0

    # ---- plumbing -----------------------------------------------------------------------------------------
    def _connection(self):
        return _Guarded(self._pool, self.description)

    @staticmethod
    def _row(row: tuple) -> Approval:
        return approval_from_row(row)

    @staticmethod
    def _values(approval: Approval) -> tuple:
        return approval_row(approval, Jsonb)

    def _select(self, conn, where: str, args: tuple, lock: bool = False) -> list[Approval]:
        query = _SELECT + sql.SQL(" WHERE " + where + (" FOR UPDATE" if lock else ""))
        return [self._row(r) for r in conn.execute(query, args).fetchall()]

    def _one(self, conn, approval_id: str, lock: bool = False) -> Approval | None:
        found = self._select(conn, "id = %s", (approval_id,), lock)
        return found[0] if found else None

    @staticmethod
    def _notify(conn, approval_ids) -> None:
        for approval_id in approval_ids:  # delivered when (and only if) the transaction commits
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, approval_id))

    # ---- the interface -----------------------------------------------------------------------------------
    def hold(self, candidate: Approval, flow_id: str, now: float,
             on_create: BeforeCommit | None = None) -> tuple[Approval, str]:
        with self._connection() as conn, conn.transaction():
            # Holds of one request key take turns: a retry and its original never both create one.
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_HOLD_LOCK, candidate.key))
            recent = self._select(conn, "key = %s AND rule = %s ORDER BY created_at DESC LIMIT 5",
                                  (candidate.key, candidate.rule))
            for approval in recent:
                how = attach_or_reuse(approval, now)
                if how:
                    row = conn.execute("UPDATE approvals SET flows = flows || %s WHERE id = %s RETURNING flows",
                                       (Jsonb([flow_id]), approval.id)).fetchone()
                    approval.flows = row[0]
                    return approval, how
            candidate.flows = [flow_id]
            conn.execute(sql.SQL("INSERT INTO approvals ({}) VALUES ({})").format(
                sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)), sql.SQL(", ").join([sql.Placeholder()] * len(
                    _COLUMNS))), self._values(candidate))
            if on_create is not None:
                on_create(candidate)
            return candidate, "created"

    def get(self, approval_id: str) -> Approval | None:
        with self._connection() as conn:
            return self._one(conn, approval_id)

    def list(self, status: str | None = None, limit: int = 200, viewer: Viewer | None = None) -> list[Approval]:
        where, args = ["true"], []
        if status:
            where.append("status = %s")
            args.append(status)
        if viewer is not None:
            # auditgate.approval.rules.may_see in SQL: their own (same principal), or a rule whose approver
            # groups meet theirs.
            where.append("((requester_principal IS NOT NULL AND requester_principal = %s) "
                         "OR approver_groups ?| %s::text[])")
            args += [viewer.principal, list(viewer.groups)]
        with self._connection() as conn:
            return self._select(conn, f"{' AND '.join(where)} ORDER BY created_at DESC LIMIT %s", (*args, limit))

    def decide(self, approval_id: str, status: str, by: dict | None, reason: str | None, now: float | None = None,
               before_commit: BeforeCommit | None = None) -> Approval:
        assert status in (APPROVED, DENIED, EXPIRED)
        # DecisionRefused is frozen: contextlib (the pool's and the transaction's context managers) cannot pass
        # it through, so a refusal is raised once both are left (the transaction committed or rolled back).
        refused: DecisionRefused | None = None
        with self._connection() as conn:
            with conn.transaction():
                current = self._one(conn, approval_id, lock=True)  # the row lock: deciders take turns
                if current is None:
                    refused = DecisionRefused(404, "not_found", f"no approval {approval_id!r}")
                elif current.status != PENDING:
                    refused = DecisionRefused(409, "already_decided",
                                              f"this request is no longer pending (it is {current.status})")
                else:
                    if now is None:
                        now = time.time()  # read once the row lock is held (as SQLite's write lock)
                    if status != EXPIRED and current.expires_at <= now:
                        # Past its expiry and nobody closed it yet: closed now, and the decision refused.
                        conn.execute("UPDATE approvals SET status = %s, decided_at = %s, reason = %s WHERE id = %s",
                                     (EXPIRED, now, TOO_LATE, approval_id))
                        closed = current
                        closed.status, closed.decided_at, closed.reason = EXPIRED, now, TOO_LATE
                        self._notify(conn, [approval_id])
                        refused = DecisionTooLate(
                            409, "approval_expired", f"this request expired {now - current.expires_at:.1f}s before "
                            "the decision; it can no longer be approved or denied", closed)
                    else:
                        row = conn.execute(sql.SQL("UPDATE approvals SET status = %s, decided_at = %s, "
                                                   "decided_by = %s, reason = %s WHERE id = %s") + _RETURNING,
                                           (status, now, Jsonb(by), reason, approval_id)).fetchone()
                        decided = self._row(row)
                        self._notify(conn, [approval_id])
                        if before_commit is not None:
                            before_commit(decided)
        if refused is not None:
            raise refused
        return decided

    def add_refusal(self, approval_id: str, refusal: dict) -> None:
        with self._connection() as conn:
            conn.execute("UPDATE approvals SET refusals = refusals || %s WHERE id = %s",
                         (Jsonb([refusal]), approval_id))

    def claim(self, approval_id: str, flow_id: str, now: float) -> bool:
        with self._connection() as conn, conn.transaction():
            approval = self._one(conn, approval_id, lock=True)
            ok = approval is not None and approval.status == APPROVED and (
                not approval.forwarded or flow_id in approval.forwarded
                or (approval.decided_at is not None and now < approval.decided_at + approval.reuse_seconds))
            if ok and flow_id not in approval.forwarded:
                conn.execute("UPDATE approvals SET forwarded = forwarded || %s WHERE id = %s",
                             (Jsonb([flow_id]), approval_id))
            return ok

    def cancel_abandoned(self, approval_id: str, flows_seen: int, now: float, reason: str) -> Approval | None:
        with self._connection() as conn, conn.transaction():
            row = conn.execute(sql.SQL("UPDATE approvals SET status = %s, decided_at = %s, reason = %s "
                                       "WHERE id = %s AND status = %s AND jsonb_array_length(flows) = %s")
                               + _RETURNING, (EXPIRED, now, reason, approval_id, PENDING, flows_seen)).fetchone()
            if row is None:
                return None
            self._notify(conn, [approval_id])
            return self._row(row)

    def _close_where(self, where: str, args: tuple, now: float, reason: str) -> list[Approval]:
        with self._connection() as conn:
            # A read first: the usual answer (nothing to close) takes no row lock.
            if conn.execute(f"SELECT 1 FROM approvals WHERE {where} LIMIT 1", args).fetchone() is None:
                return []
            with conn.transaction():
                rows = conn.execute(sql.SQL("UPDATE approvals SET status = %s, decided_at = %s, reason = %s WHERE "
                                            + where) + _RETURNING, (EXPIRED, now, reason, *args)).fetchall()
                closed = [self._row(r) for r in rows]
                self._notify(conn, [a.id for a in closed])
            return closed

    def expire_overdue(self, now: float) -> list[Approval]:
        return self._close_where("status = %s AND expires_at <= %s", (PENDING, now), now, "not decided in time")

    def heartbeat(self, holder: str, instance: str, now: float, lease_s: float) -> None:
        with self._connection() as conn:
            conn.execute("INSERT INTO instance_leases (holder, instance, started_at, heartbeat_at, lease_until) "
                         "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (holder) DO UPDATE SET "
                         "heartbeat_at = excluded.heartbeat_at, lease_until = excluded.lease_until",
                         (holder, instance, now, now, now + lease_s))

    def release(self, holder: str) -> None:
        with self._connection() as conn:
            conn.execute("DELETE FROM instance_leases WHERE holder = %s", (holder,))

    def instances(self, now: float) -> list[dict]:
        with self._connection() as conn:
            conn.row_factory = dict_row
            try:
                rows = conn.execute("SELECT holder, instance, started_at, heartbeat_at, lease_until "
                                    "FROM instance_leases ORDER BY instance, started_at").fetchall()
            finally:
                conn.row_factory = psycopg.rows.tuple_row
        return [{**r, "live": r["lease_until"] > now} for r in rows]

    def expire_orphans(self, live_holder: str, now: float) -> list[Approval]:
        return self._close_where(_ORPHANED, (PENDING, live_holder, now), now, ORPHANED)

    def close(self) -> None:
        self._pool.close(timeout=1.0)


class _Guarded:
    """A pooled connection whose failures become StoreUnavailable (DecisionRefused and the callbacks' own
    exceptions pass through: they roll the transaction back and mean what they say)."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, description: str) -> None:
        self._pool, self._description, self._context = pool, description, None

    def __enter__(self):
        try:
            self._context = self._pool.connection()
            return self._context.__enter__()
        except (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, OSError) as e:
            raise StoreUnavailable(f"{self._description} is unavailable: {type(e).__name__}: {e}") from e

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            self._context.__exit__(kind, error, traceback)
        except (psycopg.Error, OSError) as e:
            if error is None:
                raise StoreUnavailable(f"{self._description} is unavailable: {type(e).__name__}: {e}") from e
        if isinstance(error, (psycopg.Error, psycopg_pool.PoolTimeout, OSError)):
            raise StoreUnavailable(f"{self._description} is unavailable: {type(error).__name__}: {error}") from error
        return False


class ChangeListener:
    """LISTENs for changed approvals on a connection of its own, on a thread; calls on_change(approval_id), and
    on_change(None) after (re)connecting, when notifications may have been missed."""

    def __init__(self, dsn: str, on_change: Callable[[str | None], None], busy_timeout: float = 2.0) -> None:
        self._dsn, self._on_change, self._busy_timeout = dsn, on_change, busy_timeout
        self._description = describe_dsn(dsn)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="approvals-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, **_connect_kwargs(self._busy_timeout)) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    if failing:
                        logger.info("approvals: listening to %s again", self._description)
                    failing = False
                    self._on_change(None)
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            self._on_change(notify.payload)
            except (psycopg.Error, OSError) as e:
                if self._stop.is_set():
                    return
                if not failing:  # once per outage; held flows re-read the store meanwhile
                    logger.warning("approvals: lost the notifications of %s (%s); retrying", self._description,
                                   type(e).__name__)
                failing = True
                self._stop.wait(1.0)
