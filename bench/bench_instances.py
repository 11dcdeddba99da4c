"""Benchmark: one gateway instance against two behind HAProxy, and an approval's round trip through each store.

Run with the project's venv: .venv/bin/python bench/bench_instances.py [--scenario all|instances|approvals]
[--clients 8 32] [--rounds 3] [--requests 1000] [--no-pin]

- instances: requests/s with masked replies (three personal data values in each ~2 KB reply), with 8 and 32
  concurrent clients, of: one bare mitmdump (the reference, direct), one gateway behind HAProxy, two gateways
  behind HAProxy; each as a ratio to bare mitmdump, and two instances against one (issue 15's target: >= 1.6x).
  The docs' recipe, one mitmdump per core: each instance pinned to a core of its own (gw-1 and bare mitmdump on
  the first, gw-2 on the second; the processes they start inherit it, and the masking addon then masks small
  bodies inline, as a one-core process does), in the 1- and the 2-instance runs alike. The load generator, the
  upstream and HAProxy run on the second core (--no-load-core: anywhere), in both runs: the first instance has
  its core to itself, the second shares its core with them, and whatever CPU they spend per request the second
  instance does not get; HAProxy balances by least connections (the docs' recipe), so the instance with a core
  of its own takes the larger share. They are made lean for that: bench/load_client.py (asyncio keep-alive
  connections in a process of its own, each reply checked masked), bench/lean_upstream.py (an asyncio server
  sending fake_openai's reply, built once), HAProxy with keep-alive to the gateways, connections reused across
  clients and one thread (a new backend connection per request costs a gateway ~2-3 ms more).
  Besides requests/s it prints each part's CPU per request (from /proc, bench/process_cpu.py), how busy the
  parts and the whole machine kept the cores (another user's load shows there), and the bound this puts on
  2 / 1 instances: 2 G1/(G2+C), G1 and G2 a gateway's CPU per request in the 1- and 2-instance runs, C the load
  generator's, upstream's and HAProxy's.
- approvals: the store calls of one approval's round trip (hold, the decision from another connection, the
  holder reading it, claim) through the gateway's threaded store, SQLite file against a local PostgreSQL
  (tests/postgres_server.py), and how soon the holder learns of the decision (PostgreSQL: NOTIFY; SQLite:
  the gateway re-reads every POLL_SECONDS).
Needs Debian's haproxy and postgresql (see run_tests.sh). Measure on a quiet machine: with other work running,
the "whole machine" column exceeds "ours" and the ratios mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("TLDEXTRACT_CACHE", os.path.join(tempfile.gettempdir(), "auditgate-tldextract"))

from auditgate.core.shipped import SHIPPED_RULES  # noqa: E402
from auditgate.identity.service_tokens import add_service_token  # noqa: E402
from bench.bench_gateway import BIN, BODY, UPSTREAM_KEY, Processes  # noqa: E402
from bench.load_client import LoadRun  # noqa: E402
from bench.process_cpu import cpu_seconds  # noqa: E402

CLIENT = "client"
PARTS = [CLIENT, "upstream", "HAProxy", "gw-1", "gw-2", "bare mitmdump"]
# What the other processes of the request path spend per request, set against the gateways' own (C against G).
SUPPORT = [CLIENT, "upstream", "HAProxy"]


@dataclass
class Target:
    url: str
    parts: dict[str, int]  # part name -> pid (the load generator's is added for each run)
    masked: bool


@dataclass
class Tally:
    rates: list[float] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # part -> CPU seconds over every round
    machine: float = 0.0  # CPU seconds the whole machine spent meanwhile (other people's work included)

    def per_request_us(self, part: str) -> float | None:
        return self.cpu[part] / self.requests * 1e6 if part in self.cpu and self.requests else None


def _machine_cpu_seconds() -> float:
    """CPU time every core of the machine spent on anything but idling and waiting for I/O."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def pinned(cores: set[int] | None):
    """Processes started inside inherit this process's affinity (and so does everything they start later:
    masking workers, the flow writer); restored afterwards."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def instance_cores(pin: bool) -> list[set[int] | None]:
    """The core of each gateway instance (and of bare mitmdump: the first), or None when not pinned."""
    available = sorted(os.sched_getaffinity(0))
    if not pin or len(available) < 2:
        return [None, None]
    return [{available[0]}, {available[1]}]


def start_instances(procs: Processes, workdir: Path, reply_bytes: int, cores: list[set[int] | None],
                    load_cores: set[int] | None, balance: str) -> tuple:
    with pinned(load_cores):
        port = int(procs.start("upstream", [sys.executable, "-m", "bench.lean_upstream", "--reply-bytes",
                                            str(reply_bytes)], r"PORT (\d+)").group(1))
    upstream = procs.procs[-1].pid
    confdir = workdir / "confdir"
    common = ["--mode", f"reverse:http://127.0.0.1:{port}", "-p", "0", "--set", "listen_host=127.0.0.1",
              "--set", f"confdir={confdir}", "--set", "flow_detail=0", "--set", "termlog_verbosity=info"]
    with pinned(cores[0]):
        bare = int(procs.start("bare", [str(BIN / "mitmdump"), *common], r"listening at 127\.0\.0\.1:(\d+)").group(1))
    bare_pid = procs.procs[-1].pid
    rules = workdir / "rules"
    shutil.copytree(SHIPPED_RULES, rules)
    (rules / "identities.yaml").write_text("service_tokens: []\n")
    token = add_service_token(rules, "bench", ["agents"])
    gateways = []
    for name, core in zip(("gw-1", "gw-2"), cores):  # shared rules and CA; each its own records and instance name
        with pinned(core):
            port_of = int(procs.start(
                name, [str(BIN / "mitmdump"), *common, "-s", str(ROOT / "addons" / "gateway.py"),
                       "--set", f"gateway_rules={rules}", "--set", f"gateway_records={workdir / ('records-' + name)}",
                       "--set", f"gateway_instance={name}", "--set", "approval_admin_listen=127.0.0.1:0"],
                r"OPENAI_BASE_URL=http://127\.0\.0\.1:(\d+)", env={"OPENAI_API_KEY": UPSTREAM_KEY}).group(1))
        gateways.append((name, port_of, procs.procs[-1].pid))
    from tests.haproxy import HAProxy

    # Keep-alive to the gateways with connections reused across clients, and one thread: the cheapest HAProxy
    # per request (a new backend connection per request costs a mitmproxy instance more than the request).
    with pinned(load_cores):
        one = HAProxy(workdir / "haproxy-1", [(name, p) for name, p, _ in gateways[:1]], backend_keep_alive=True,
                      threads=1, balance=balance).start()
        two = HAProxy(workdir / "haproxy-2", [(name, p) for name, p, _ in gateways], backend_keep_alive=True,
                      threads=1, balance=balance).start()
    pids = {name: pid for name, _, pid in gateways}
    targets = {
        "bare mitmdump": Target(f"http://127.0.0.1:{bare}/v1/responses",
                                {"upstream": upstream, "bare mitmdump": bare_pid}, masked=False),
        "1 instance (HAProxy)": Target(f"{one.url}/v1/responses",
                                       {"upstream": upstream, "HAProxy": one.proc.pid, "gw-1": pids["gw-1"]}, True),
        "2 instances (HAProxy)": Target(f"{two.url}/v1/responses",
                                        {"upstream": upstream, "HAProxy": two.proc.pid, **pids}, True),
    }
    return targets, token, [one, two]


def measure(target: Target, token: str, clients: int, requests: int, tally: Tally | None,
            load_cores: set[int] | None = None) -> float:
    """One run of the load generator against target; its rate, and its CPU per part added to tally."""
    with pinned(load_cores):
        run = LoadRun(target.url, token, clients, requests, json.dumps(BODY).encode(), target.masked)
    try:
        parts = {**target.parts, CLIENT: run.pid}
        before, machine = cpu_seconds(*parts.values()), _machine_cpu_seconds()
        result = run.go()
        after, machine = cpu_seconds(*parts.values()), _machine_cpu_seconds() - machine
    finally:
        run.close()
    if result["errors"]:
        raise SystemExit(f"{result['errors']} of {requests} requests to {target.url} failed: {result['first_error']}")
    if tally is not None:
        tally.rates.append(result["rate"])
        tally.requests += result["requests"]
        tally.seconds += result["seconds"]
        tally.machine += machine
        for part, pid in parts.items():
            tally.cpu[part] = tally.cpu.get(part, 0.0) + after[pid] - before[pid]
    return result["rate"]


def _us(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def instances_scenario(args, workdir: Path) -> None:
    procs = Processes(workdir)
    balancers = []
    cores = instance_cores(not args.no_pin)
    load_cores = cores[1] if args.load_core and cores[1] else None
    try:
        targets, token, balancers = start_instances(procs, workdir, args.reply_text_bytes, cores, load_cores,
                                                    args.balance)
        tallies: dict[int, dict[str, Tally]] = {}
        for clients in args.clients:
            tallies[clients] = {name: Tally() for name in targets}
            for target in targets.values():
                measure(target, token, clients, max(4 * clients, 40), None, load_cores)  # warm up: masking, connections
            for _ in range(args.rounds):  # targets take turns, so a slow spell of the machine weighs on each
                for name, target in targets.items():
                    measure(target, token, clients, args.requests, tallies[clients][name], load_cores)
        names = list(targets)
        print(f"\n## instances: masked ~2 KB replies, requests/s (best of {args.rounds} rounds of {args.requests} "
              "requests)")
        print("| clients | " + " | ".join(names) + " | 1 instance / bare | 2 instances / bare | 2 / 1 instances |")
        print("| --- |" + " --- |" * (len(names) + 3))
        for clients, tally in tallies.items():
            best = {name: max(t.rates) for name, t in tally.items()}
            bare, one, two = best["bare mitmdump"], best["1 instance (HAProxy)"], best["2 instances (HAProxy)"]
            print(f"| {clients} | " + " | ".join(f"{v:.0f}" for v in best.values())
                  + f" | {one / bare:.2f} | {two / bare:.2f} | {two / one:.2f} |")
        print("\n## where the CPU goes: us of CPU per request (every round), and cores kept busy (CPU / wall time)")
        print("| clients | target | " + " | ".join(PARTS) + " | ours, cores | whole machine, cores |")
        print("| --- | --- |" + " --- |" * (len(PARTS) + 2))
        for clients, tally in tallies.items():
            for name, t in tally.items():
                print(f"| {clients} | {name} | " + " | ".join(_us(t.per_request_us(p)) for p in PARTS)
                      + f" | {sum(t.cpu.values()) / t.seconds:.2f} | {t.machine / t.seconds:.2f} |")
        print("\nWhat bounds 2 / 1 instances when every core is busy: one instance has a core of its own and the rest "
              "the other, so 1/G1 requests/s; two share both cores with the rest, so 2/(G2+C): 2/1 <= 2 G1/(G2+C), "
              "with G1, G2 a gateway's CPU per request in the 1- and 2-instance runs and C the load generator's, "
              "upstream's and HAProxy's (>= 1.6x needs C <= G/4 and G2 close to G1; G2 above G1 on a quiet machine: "
              "the cores share something, e.g. hyperthreads of one physical core). A core kept less than fully busy "
              "by its instance is waiting, not working.")
        for clients, tally in tallies.items():
            one, two = tally["1 instance (HAProxy)"], tally["2 instances (HAProxy)"]
            g1 = one.per_request_us("gw-1") or 0
            g2 = sum(two.per_request_us(p) or 0 for p in ("gw-1", "gw-2"))
            c = sum(two.per_request_us(p) or 0 for p in SUPPORT)
            busy = " / ".join(f"{two.cpu[p] / two.seconds:.0%}" for p in ("gw-1", "gw-2"))
            print(f"- {clients} clients: G1 {g1:.0f} us, G2 {g2:.0f} us, C {c:.0f} us (C/G2 {c / g2:.2f}): "
                  f"2 G1/(G2+C) = {2 * g1 / (g2 + c):.2f}, 2 G2/(G2+C) = {2 * g2 / (g2 + c):.2f}; cores kept busy by "
                  f"the instance: 1 instance {one.cpu['gw-1'] / one.seconds:.0%}, 2 instances {busy}; CPU share "
                  f"gw-1 / gw-2 {(two.per_request_us('gw-1') or 0) / g2:.0%} / {(two.per_request_us('gw-2') or 0) / g2:.0%}")
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
    parser.add_argument("--requests", type=int, default=1000, help="requests per round (split among the clients)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reply-text-bytes", type=int, default=1400, help="1400 gives a ~2 KB JSON reply")
    parser.add_argument("--approvals", type=int, default=200)
    parser.add_argument("--no-pin", action="store_true", help="let the OS place the gateway instances")
    parser.add_argument("--load-core", action=argparse.BooleanOptionalAction, default=True,
                        help="the load generator, upstream and HAProxy on the second instance's core (default), "
                             "so the first instance's core is its own in both runs; --no-load-core: not pinned")
    parser.add_argument("--balance", default="leastconn", choices=["leastconn", "roundrobin"],
                        help="HAProxy's balance: leastconn (default; the docs' recipe: a request held for "
                             "approval keeps its connection) or roundrobin")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    cores = instance_cores(not args.no_pin)
    load = (f"on core {min(cores[1])} with gw-2" if args.load_core and cores[1] else "not pinned")
    placement = ("not pinned" if cores[0] is None else
                 f"gw-1 and bare mitmdump on core {min(cores[0])}, gw-2 on core {min(cores[1])} (each with its "
                 f"child processes); load generator, upstream and HAProxy {load}; HAProxy balance {args.balance}")
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; commit {commit.strip() or '?'}; "
          f"{time.strftime('%Y-%m-%d')}; {placement}")
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
