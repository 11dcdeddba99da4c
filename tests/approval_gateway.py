"""A gateway with its approvals admin listener on a free port, and a small client for the admin API."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.gateway_process import GatewayProcess

_ADMIN = re.compile(r"approvals: admin API and approver page at (http://127\.0\.0\.1:\d+)/approvals")

# Rules the end-to-end tests add in front of the shipped pack: markers in the prompt pick the rule.
TEST_RULES = """
  - id: approve-marker
    match: {text: {keywords: [needs-approval-marker]}}
    action: require_approval
    approvers: [approvers]
    timeout_seconds: 30
  - id: approve-quick-timeout
    match: {text: {keywords: [times-out-marker]}}
    action: require_approval
    approvers: [approvers]
    timeout_seconds: 1.5
  - id: approve-with-reuse
    match: {text: {keywords: [reuse-marker]}}
    action: require_approval
    approvers: [approvers]
    timeout_seconds: 30
    reuse_seconds: 60
  - id: log-marker
    match: {text: {keywords: [log-marker]}}
    action: log
"""


def add_test_rules(rules: Path) -> None:
    """Put TEST_RULES before the shipped rules of rules/policy.yaml (and start one masking worker, not one
    per core: these gateways hold requests, they do not mask big bodies, and start faster so)."""
    path = rules / "policy.yaml"
    text = path.read_text()
    path.write_text(text.replace("\nrules:\n", "\nrules:\n" + TEST_RULES, 1))
    masking = rules / "masking.yaml"
    masking.write_text(masking.read_text().replace("\nworkers: 0\n", "\nworkers: 1\n"))


def admin_url(gateway: GatewayProcess, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _ADMIN.search(gateway.log())
        if match:
            return match.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no admin listener in the log:\n{gateway.log()}")


@dataclass
class AdminClient:
    base: str
    token: str

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"authorization": f"Bearer {self.token}",
                                                  "content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def pending(self) -> list[dict]:
        status, body = self.call("GET", "/api/approvals?status=pending")
        assert status == 200, body
        return body["approvals"]

    def approve(self, approval_id: str, reason: str | None = None) -> tuple[int, dict]:
        return self.call("POST", f"/api/approvals/{approval_id}/approve", {"reason": reason})

    def deny(self, approval_id: str, reason: str | None = None) -> tuple[int, dict]:
        return self.call("POST", f"/api/approvals/{approval_id}/deny", {"reason": reason})

    def wait_pending(self, predicate=lambda a: True, count: int = 1, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [a for a in self.pending() if predicate(a)]
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} pending approval(s) after {timeout}s: {self.pending()}")


# Another process: opens the store file with its own connection, takes SQLite's write lock
# (BEGIN EXCLUSIVE) and keeps it until told to let go on stdin.
_LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
db.close()
print("released", flush=True)
"""


class StoreLocker:
    """A separate Python process holding the approvals store's write lock until release()."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _LOCKER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == "locked", f"the locker did not take the lock: {line!r}"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            assert self.proc.stdout.readline().strip() == "released"
            self.proc.wait(10)

    def __enter__(self) -> "StoreLocker":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.release()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
