"""Three gateway instances sharing approvals in a real PostgreSQL, behind a real HAProxy, driven by the real openai SDK.

Each instance has its own records directory and gateway_instance; the rules directory and the CA are shared; the
store's DSN reaches them through the environment (gateway_approvals=env:NAME). A request held on one instance is
decided through another's admin API and released at once (NOTIFY); nobody approves their own request on any
instance; an instance killed with SIGKILL loses its held requests only once its lease has lapsed, and the others
keep theirs; the DSN and its password are in no file the gateways wrote.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from auditgate.identity.service_tokens import add_service_token
from tests import haproxy as haproxy_module
from tests.approval_gateway import AdminClient, add_test_rules, admin_url
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GatewayProcess
from tests.haproxy import HAProxy
from tests.postgres_server import postgres_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.e2e

INSTANCES = ("gw-a", "gw-b", "gw-c")
LEASE_MS = 3000
DSN_VARIABLE = "AUDITGATE_TEST_APPROVALS_DSN"


class Cluster:
    def __init__(self, directory: Path, dsn: str, password: str, gateways: dict[str, GatewayProcess],
                 balancer: HAProxy, tokens: dict[str, str]) -> None:
        self.directory, self.dsn, self.password = directory, dsn, password
        self.gateways, self.balancer, self.tokens = gateways, balancer, tokens
        self.admins = {name: admin_url(gateway) for name, gateway in gateways.items()}

    def admin(self, instance: str, who: str) -> AdminClient:
        return AdminClient(self.admins[instance], self.tokens[who])

    def live(self) -> list[str]:
        return [name for name, g in self.gateways.items() if g.proc.poll() is None]

    def ask(self, text: str, out: dict, who: str = "alice") -> threading.Thread:
        """The caller's SDK request, through HAProxy, in a thread of its own (it waits while held)."""
        def call():
            client = openai.OpenAI(base_url=f"{self.balancer.url}/v1", api_key=self.tokens[who], max_retries=0,
                                   timeout=60)
            try:
                out["response"] = client.responses.create(model="gpt-test", input=text)
            except Exception as e:
                out["error"] = e
            out["at"] = time.monotonic()
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        return thread

    def held(self, marker: str, via: str | None = None) -> dict:
        via = via or self.live()[0]
        [pending] = self.admin(via, "bob").wait_pending(lambda a: marker in (a.get("preview") or ""))
        return pending


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres_server, confdir, upstream_server):  # noqa: F811
    reason = haproxy_module.skip_reason()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("scale-out")
    dsn = postgres_server.new_database()
    rules = make_rules(directory / "rules", upstreams=[])
    add_test_rules(rules)
    tokens = {"alice": add_service_token(rules, "alice", ["agents", "approvers"]),
              "bob": add_service_token(rules, "bob", ["approvers"])}
    env = {**gateway_env(), DSN_VARIABLE: dsn}
    gateways = {name: GatewayProcess(
        directory / name, rules=rules, records=directory / name / "records", confdir=confdir, env=env,
        args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}", "--set", f"gateway_instance={name}",
              "--set", f"gateway_approvals=env:{DSN_VARIABLE}", "--set", "approval_admin_listen=127.0.0.1:0",
              "--set", f"approval_instance_lease_ms={LEASE_MS}"]) for name in INSTANCES}
    balancer = None
    try:
        with ThreadPoolExecutor(len(gateways)) as pool:
            list(pool.map(lambda g: g.start(60), gateways.values()))
        balancer = HAProxy(directory / "haproxy", [(name, g.port) for name, g in gateways.items()]).start()
        yield Cluster(directory, dsn, postgres_server.password, gateways, balancer, tokens)
    finally:
        if balancer is not None:
            balancer.stop()
        for gateway in gateways.values():
            gateway.stop()


def test_a_request_held_on_one_instance_is_approved_through_another_and_released_at_once(cluster, upstream):
    out: dict = {}
    thread = cluster.ask("scale-out cross-instance needs-approval-marker", out)
    pending = cluster.held("cross-instance")
    holder = pending["instance"]
    assert holder in INSTANCES
    other = next(name for name in INSTANCES if name != holder)
    approved_at = time.monotonic()
    status, body = cluster.admin(other, "bob").approve(pending["id"], "ok from another instance")
    assert status == 200 and body["status"] == "approved", body
    thread.join(10)
    assert "response" in out, out.get("error")
    assert out["at"] - approved_at < 1.0, f"released {out['at'] - approved_at:.2f}s after the decision"
    assert len(upstream.received) == 1
    # Every instance's API shows it decided, whichever holds it.
    for name in INSTANCES:
        status, shown = cluster.admin(name, "bob").call("GET", f"/api/approvals/{pending['id']}")
        assert (status, shown["status"], shown["instance"]) == (200, "approved", holder)


def test_nobody_approves_their_own_request_on_any_instance(cluster, upstream):
    out: dict = {}
    thread = cluster.ask("scale-out self-approval needs-approval-marker", out)
    pending = cluster.held("self-approval")
    for name in INSTANCES:
        status, body = cluster.admin(name, "alice").approve(pending["id"])
        assert (status, body["error"]["code"]) == (403, "self_approval_refused"), (name, body)
    status, shown = cluster.admin(INSTANCES[0], "bob").call("GET", f"/api/approvals/{pending['id']}")
    assert shown["status"] == "pending" and len(shown["refusals"]) == len(INSTANCES)
    status, _ = cluster.admin(INSTANCES[-1], "bob").deny(pending["id"], "not this one")
    assert status == 200
    thread.join(10)
    assert isinstance(out.get("error"), openai.PermissionDeniedError) and upstream.received == []


def test_an_instance_killed_while_holding_loses_its_request_after_its_lease_and_the_others_keep_theirs(cluster):
    held: dict[str, tuple[dict, dict, threading.Thread]] = {}
    for attempt in range(9):  # round robin: each instance holds one of the first three, as a rule
        if len(held) == len(INSTANCES):
            break
        out: dict = {}
        marker = f"lease-{attempt}-x"
        thread = cluster.ask(f"scale-out {marker} needs-approval-marker", out)
        pending = cluster.held(marker)
        if pending["instance"] in held:
            cluster.admin(INSTANCES[0], "bob").deny(pending["id"], "a spare")
            thread.join(10)
            continue
        held[pending["instance"]] = (pending, out, thread)
    assert set(held) == set(INSTANCES), f"HAProxy sent the requests to {sorted(held)} only"

    victim, survivors = INSTANCES[0], INSTANCES[1:]
    gateway = cluster.gateways[victim]
    os.killpg(gateway.proc.pid, signal.SIGKILL)  # kill -9: no goodbye, its lease simply stops being renewed
    gateway.proc.wait(10)
    killed_at = time.monotonic()
    watcher = cluster.admin(survivors[0], "bob")
    status, shown = watcher.call("GET", f"/api/approvals/{held[victim][0]['id']}")
    assert shown["status"] == "pending", "closed before the victim's lease lapsed"
    deadline = killed_at + LEASE_MS / 1000 + 10
    while True:
        status, shown = watcher.call("GET", f"/api/approvals/{held[victim][0]['id']}")
        if shown["status"] != "pending" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (shown["status"], shown["reason"]) == ("expired", "the gateway holding the request stopped; the request "
                                                             "is gone")
    for name in survivors:  # the living instances' held requests are untouched, and still decidable
        status, mine = watcher.call("GET", f"/api/approvals/{held[name][0]['id']}")
        assert mine["status"] == "pending", (name, mine)
    for name, decider in zip(survivors, reversed(survivors)):
        status, _ = cluster.admin(decider, "bob").approve(held[name][0]["id"])
        assert status == 200
        held[name][2].join(10)
        assert "response" in held[name][1], held[name][1].get("error")
    held[victim][2].join(10)
    assert "response" not in held[victim][1]


def test_the_stores_dsn_and_password_are_in_no_file_the_gateways_wrote(cluster):
    out: dict = {}
    cluster.ask("scale-out log-marker plain request", out).join(30)
    secrets = [cluster.dsn.encode(), cluster.password.encode()]
    scanned = 0
    for name, gateway in cluster.gateways.items():
        for path in [*gateway.workdir.rglob("*"), *gateway.records.rglob("*")]:
            if path.is_file():
                data = path.read_bytes()
                scanned += 1
                assert not any(secret in data for secret in secrets), f"{path} holds the store's DSN or password"
    assert scanned >= 3 * 3  # each instance's log, flow files and audit log at least
