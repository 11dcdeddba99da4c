"""Which approvals store a gateway uses: the `gateway_approvals` option (no mitmproxy).

    ""                          the SQLite file <records>/approvals.sqlite3 (one gateway, or several on one machine)
    postgresql://USER:PW@HOST/DB   PostgreSQL, shared by any number of gateway instances
    env:NAME                    the DSN read from the environment variable NAME (keeps the password off the
                                command line, where `ps` shows it)

The DSN is a secret: the `StoreChoice` never shows it (repr, messages), only host, port and database.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from auditgate.approval.store import STORE_FILE, ThreadedApprovalStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class StoreChoice:
    kind: str  # sqlite | postgresql
    path: Path | None = None
    dsn: str | None = field(default=None, repr=False)

    @property
    def description(self) -> str:
        if self.kind == "sqlite":
            return f"the approvals store {self.path}"
        from auditgate.approval.postgres import describe_dsn

        return describe_dsn(self.dsn)

    def threaded(self, busy_timeout: float) -> ThreadedApprovalStore:
        """The awaitable store the gateway uses (not opened yet: `open_now`)."""
        if self.kind == "sqlite":
            return ThreadedApprovalStore(self.path, busy_timeout)
        from auditgate.approval.postgres import ChangeListener, PostgresApprovalStore

        return ThreadedApprovalStore(
            None, busy_timeout, opener=functools.partial(PostgresApprovalStore, self.dsn, busy_timeout),
            description=self.description,
            listener=lambda on_change: ChangeListener(self.dsn, on_change, busy_timeout))


def choose_store(value: str, records: Path, environ: dict | None = None) -> StoreChoice:
    """The store `gateway_approvals=value` names; ValueError (never quoting a DSN) when it names none."""
    environ = os.environ if environ is None else environ
    value = value.strip()
    if not value:
        return StoreChoice("sqlite", path=records / STORE_FILE)
    if value.startswith("env:"):
        name = value[4:]
        dsn = environ.get(name, "").strip()
        if not dsn:
            raise ValueError(f"gateway_approvals: the environment variable {name!r} is not set or empty")
        where = f"the environment variable {name!r}"
    else:
        dsn, where = value, "gateway_approvals"
    if not dsn.startswith(POSTGRES_SCHEMES):
        raise ValueError(f"gateway_approvals: {where} must hold a postgresql:// DSN (or leave the option empty for "
                         "the SQLite file in the records directory)")
    from auditgate.approval.postgres import check_dsn

    check_dsn(dsn)
    return StoreChoice("postgresql", dsn=dsn)
