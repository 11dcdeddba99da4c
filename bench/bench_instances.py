"""Benchmark: one gateway instance against two behind HAProxy, and an approval's round trip through each store.

Run with the project's venv: .venv/bin/python bench/bench_instances.py [--scenario all|instances|approvals]

- instances: requests/s with masked replies (three personal data values in each ~2 KB reply), with 8 and 32
  concurrent clients, of: one bare mitmdump (the reference), one gateway behind HAProxy, two gateways behind
  HAProxy; each as a ratio to bare mitmdump, and two instances against one (issue 15's target: >= 1.6x).
  Nothing is pinned: the instances need every core, and the client, the upstream and HAProxy share them, so
  on a 2-core machine the client takes a good part of what a second instance would get.
- approvals: the store calls of one approval's round trip (hold, the decision from another connection, the
  holder reading it, claim) through the gateway's threaded store, SQLite file against a local PostgreSQL
  (tests/postgres_server.py), and how soon the holder learns of the decision (PostgreSQL: NOTIFY; SQLite:
  the gateway re-reads every POLL_SECONDS).
Needs Debian's haproxy and postgresql (see run_tests.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("TLDEXTRACT_CACHE", os.path.join(tempfile.gettempdir(), "auditgate-tldextract"))

from auditgate.core.shipped import SHIPPED_RULES  # noqa: E402
from auditgate.identity.service_tokens import add_service_token  # noqa: E402
from bench.bench_gateway import BIN, UPSTREAM_KEY, Processes, concurrent  # noqa: E402


def start_instances(procs: Processes, workdir: Path, reply_bytes: int) -> dict:
    port = int(procs.start("upstream", [sys.executable, "-m", "tests.fake_openai", "--reply-bytes", str(reply_bytes),
                                        "--pii"], r"PORT (\d+)").group(1))
    confdir = workdir / "confdir"
    common = ["--mode", f"reverse:http://127.0.0.1:{port}", "-p", "0", "--set", "listen_host=127.0.0.1",
              "--set", f"confdir={confdir}", "--set", "flow_detail=0", "--set", "termlog_verbosity=info"]
    bare = int(procs.start("bare", [str(BIN / "mitmdump"), *common], r"listening at 127\.0\.0\.1:(\d+)").group(1))
    rules = workdir / "rules"
    shutil.copytree(SHIPPED_RULES, rules)
    (rules / "identities.yaml").write_text("service_tokens: []\n")
    token = add_service_token(rules, "bench", ["agents"])
    gateways = []
    for name in ("gw-1", "gw-2"):  # shared rules and CA; each its own records and instance name
        gateways.append(int(procs.start(
            name, [str(BIN / "mitmdump"), *common, "-s", str(ROOT / "addons" / "gateway.py"),
                   "--set", f"gateway_rules={rules}", "--set", f"gateway_records={workdir / ('records-' + name)}",
                   "--set", f"gateway_instance={name}", "--set", "approval_admin_listen=127.0.0.1:0"],
            r"OPENAI_BASE_URL=http://127\.0\.0\.1:(\d+)", env={"OPENAI_API_KEY": UPSTREAM_KEY}).group(1)))
    from tests.haproxy import HAProxy

    one = HAProxy(workdir / "haproxy-1", [("gw-1", gateways[0])]).start()
    two = HAProxy(workdir / "haproxy-2", [("gw-1", gateways[0]), ("gw-2", gateways[1])]).start()
    return {"balancers": [one, two], "token": token, "bare mitmdump": f"http://127.0.0.1:{bare}/v1/responses",
            "1 instance (HAProxy)": f"{one.url}/v1/responses", "2 instances (HAProxy)": f"{two.url}/v1/responses"}


def instances_scenario(args, workdir: Path) -> None:
    procs = Processes(workdir)
    balancers = []
    try:
        urls = start_instances(procs, workdir, args.reply_text_bytes)
        token, balancers = urls.pop("token"), urls.pop("balancers")
        print(f"\n## instances: masked ~2 KB replies, requests/s (best of {args.rounds} rounds)")
        print("| clients | " + " | ".join(urls) + " | 1 instance / bare | 2 instances / bare | 2 / 1 instances |")
        print("| --- |" + " --- |" * (len(urls) + 3))
        for clients in args.clients:
            per_client = max(4, args.requests // clients)
            best = {}
            for name, url in urls.items():
                concurrent(url, token, clients, 2)  # warm up: connections, masking workers
                best[name] = max(concurrent(url, token, clients, per_client)[0] for _ in range(args.rounds))
            bare, one, two = best["bare mitmdump"], best["1 instance (HAProxy)"], best["2 instances (HAProxy)"]
            print(f"| {clients} | " + " | ".join(f"{v:.0f}" for v in best.values())
                  + f" | {one / bare:.2f} | {two / bare:.2f} | {two / one:.2f} |")
    finally:
        for balancer in balancers:
            balancer.stop()
        procs.stop()


async def _round_trips(threaded, make_other, n: int) -> tuple[list[float], list[float]]:
    """n approvals: the store time of each round trip, and how soon the holder learned of the decision."""
    from auditgate.approval.store import APPROVED, Approval, new_approval_id

    learned: dict[str, float] = {}
    threaded.listen(lambda approval_id: learned.setdefault(approval_id, time.perf_counter()) if approval_id else None)
    await asyncio.sleep(0.5)  # the listener connects
    other = await asyncio.to_thread(make_other)
    store_times, notify_times = [], []
    for i in range(n):
        now = time.time()
        candidate = Approval(id=new_approval_id(), key=f"bench-{i}-{now}", rule="r", requester={"name": "alice"},
                             approver_groups=["approvers"], created_at=now, expires_at=now + 60, instance="bench",
                             body_sha256="0" * 64, preview="hello")
        started = time.perf_counter()
        approval, _ = await threaded.hold(candidate, f"f{i}", now)
        deciding = time.perf_counter()
        await asyncio.to_thread(other.decide, approval.id, APPROVED, {"name": "bob"}, None, time.time())
        if threaded.pushes_changes:
            while approval.id not in learned:
                await asyncio.sleep(0.0005)
            notify_times.append(learned[approval.id] - deciding)  # from the start of the deciding call
        assert (await threaded.get(approval.id)).status == APPROVED
        assert await threaded.claim(approval.id, f"f{i}", time.time())
        store_times.append(time.perf_counter() - started)
    other.close()
    return store_times, notify_times


def approvals_scenario(args, workdir: Path) -> None:
    from auditgate.approval.postgres import PostgresApprovalStore
    from auditgate.approval.store import SqliteApprovalStore
    from auditgate.approval.stores import choose_store
    from tests.postgres_server import PostgresServer, skip_reason

    print(f"\n## approvals: one round trip (hold, decide from another connection, read, claim), {args.approvals} "
          "approvals")
    print("| store | round trip p50 ms | p99 ms | holder learns of the decision, from its start, p50 ms |")
    print("| --- | --- | --- | --- |")
    results = {}
    sqlite_path = workdir / "approvals.sqlite3"
    choice = choose_store("", workdir)
    threaded = choice.threaded(2.0)
    threaded.open_now()
    try:
        results["SQLite"] = asyncio.run(_round_trips(threaded, lambda: SqliteApprovalStore(sqlite_path), args.approvals))
    finally:
        threaded.close()
    reason = skip_reason()
    server = None
    if reason is None:
        server = PostgresServer().start()
        try:
            dsn = server.new_database()
            threaded = choose_store(dsn, workdir).threaded(2.0)
            threaded.open_now()

            async def run():
                try:
                    return await _round_trips(threaded, lambda: PostgresApprovalStore(dsn), args.approvals)
                finally:
                    threaded.close()
            results["PostgreSQL"] = asyncio.run(run())
        finally:
            server.destroy()
    for name, (store_times, notify_times) in results.items():
        ms = sorted(t * 1000 for t in store_times)
        learned = (f"{statistics.median(notify_times) * 1000:.2f} (NOTIFY)" if notify_times
                   else "up to 1000 (re-read every second)")
        print(f"| {name} | {statistics.median(ms):.2f} | {ms[int(len(ms) * 0.99) - 1]:.2f} | {learned} |")
    if reason:
        print(f"(PostgreSQL not measured: {reason})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["all", "instances", "approvals"], default="all")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--requests", type=int, default=400, help="requests per round (split among the clients)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reply-text-bytes", type=int, default=1400, help="1400 gives a ~2 KB JSON reply")
    parser.add_argument("--approvals", type=int, default=200)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; commit {commit.strip() or '?'}; "
          f"{time.strftime('%Y-%m-%d')}; not pinned")
    workdir = Path(tempfile.mkdtemp(prefix="auditgate-bench-instances-"))
    try:
        if args.scenario in ("all", "instances"):
            instances_scenario(args, workdir)
        if args.scenario in ("all", "approvals"):
            approvals_scenario(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
