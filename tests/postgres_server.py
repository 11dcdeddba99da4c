"""A real PostgreSQL server for the tests, made from the machine's own binaries in a temporary directory.

`initdb` and `pg_ctl` come from /usr/lib/postgresql/<version>/bin (Debian's `postgresql` package, which
run_tests.sh installs when missing); tests that need the server skip, saying why, only when they are absent.
PostgreSQL refuses to run as root: under root the cluster is made and run as the `postgres` user (else
`nobody`) through `setpriv`. The superuser has a password (scram-sha-256 over TCP), so that the tests can check
that it never lands anywhere; each test gets a database of its own (`new_database`).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

USER = "auditgate"


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl (/usr/local/bin/pg_ctl here is a
    symlink into one of them), or None."""
    found = []
    for bin_dir in Path("/usr/lib/postgresql").glob("*/bin"):
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file() and bin_dir.parent.name.isdigit():
            found.append((int(bin_dir.parent.name), bin_dir))
    return max(found)[1] if found else None


def skip_reason() -> str | None:
    if postgres_bin() is None:
        return ("PostgreSQL's server binaries (initdb, pg_ctl under /usr/lib/postgresql/*/bin) are not installed: "
                "apt-get install postgresql (run_tests.sh does, as root)")
    if os.geteuid() == 0 and _unprivileged_user() is None:
        return "running as root with neither a postgres nor a nobody user to run PostgreSQL as"
    return None


def _unprivileged_user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 on a free port."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.password = "pw-" + secrets.token_hex(12)
        self.port = 0
        self.directory = Path(tempfile.mkdtemp(prefix="auditgate-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        self._as_user: list[str] = []
        self._databases = 0
        if os.geteuid() == 0:
            user = _unprivileged_user()
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self._as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C"}, cwd=self.directory)

    def start(self) -> "PostgresServer":
        password_file = self.directory / "pw"
        password_file.write_text(self.password + "\n")
        if self._as_user:
            user = _unprivileged_user()
            os.chown(password_file, user.pw_uid, user.pw_gid)
        done = self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={password_file}",
                         "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-sync")
        password_file.unlink()
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
        for _ in range(5):  # a free port may be taken by someone else before the server binds it
            self.port = _free_port()
            options = (f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                             "-w", "-t", "60", "start")
            if done.returncode == 0:
                return self
        raise AssertionError(f"PostgreSQL did not start:\n{done.stderr}\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        self._databases += 1
        name = f"approvals_{self._databases}_{secrets.token_hex(3)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        options = (f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                         "-w", "-t", "60", "start")
        assert done.returncode == 0, done.stderr

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL server for this module's tests; they skip (saying why) when its binaries are absent."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer().start()
    yield server
    server.destroy()
