"""Benchmark: the gateway against bare mitmdump and a direct call, in one run, with ratios.

Run with the project's venv: .venv/bin/python bench/bench_gateway.py [--scenario all|plain|pii|stream|analyze]

- plain:   a ~2 KB Responses API reply, p50/p99 over sequential requests and requests/s with
           concurrent clients (issue 2's target: gateway p50 <= 1.3x bare mitmdump).
- pii:     the same with three personal data values in the reply, masked by the gateway
           (targets: p50 <= 1.5x bare, p99 <= 2x, 8 clients >= 0.6x bare requests/s).
- stream:  a 40-delta Responses stream spaced 25 ms apart (targets: first masked token <= direct
           + 60 ms, total <= 1.1x direct).
- analyze: masking cost per KB of text, ours against Presidio with all its default recognizers.

Pinned like an independent measurement is: each target (bare mitmdump, the gateway, the masking
addon alone) and every process it starts (masking workers, the flow writer) on one core; this
client and the upstream on the other. A design that leans on a second core shows it here instead of
borrowing the client's. --no-pin turns it off (needs 2 cores or more).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Presidio's email recognizer uses tldextract, which would download a suffix list: keep it offline.
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("TLDEXTRACT_CACHE", os.path.join(tempfile.gettempdir(), "auditgate-tldextract"))

from auditgate.core.shipped import SHIPPED_RULES  # noqa: E402
from auditgate.identity.service_tokens import add_service_token  # noqa: E402
from bench.process_cpu import cpu_seconds  # noqa: E402

BIN = Path(sys.executable).parent
BODY = {"model": "gpt-test", "input": "Summarise the quarterly report in two paragraphs."}
UPSTREAM_KEY = "sk-bench-upstream-key-0123456789abcdef"


def _wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited early:\n{log.read_text()}")
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r} in {log}")


class Cores:
    """Which cores the targets get and which the client and upstream get (None: no pinning)."""

    def __init__(self, pin: bool) -> None:
        available = sorted(os.sched_getaffinity(0))
        self.target: set[int] | None = None
        self.client: set[int] | None = None
        if pin and len(available) >= 2:
            self.target, self.client = {available[0]}, set(available[1:2])
            os.sched_setaffinity(0, self.client)  # this process and what it starts, unless told otherwise

    def describe(self) -> str:
        if self.target is None:
            return "not pinned"
        return f"targets (and their workers) on core {min(self.target)}, client and upstream on core {min(self.client)}"


CORES: Cores | None = None


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir, self.procs = workdir, []

    def start(self, name: str, args: list[str], pattern: str, env: dict | None = None, target: bool = False) -> re.Match:
        log = self.workdir / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        full_env.update(env or {})
        cores = CORES.target if (CORES and target) else None
        # Set in the child before it execs: everything the target starts later inherits its core.
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        with open(log, "wb") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                                    start_new_session=True, preexec_fn=pin)
        self.procs.append(proc)
        return _wait_for(pattern, log, proc)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


class Setup:
    """An upstream, bare mitmdump and the gateway, all in reverse mode to that upstream."""

    def __init__(self, procs: Processes, workdir: Path, script: str, upstream_args: list[str],
                 masking_alone: bool = False, baseline: str | None = None) -> None:
        name = "-".join(a.strip("-") for a in upstream_args) or "plain"
        port = int(procs.start(f"upstream-{name}", [sys.executable, "-m", "tests.fake_openai", *upstream_args],
                               r"PORT (\d+)").group(1))
        target = f"reverse:http://127.0.0.1:{port}"
        confdir = workdir / "confdir"
        common = ["--mode", target, "-p", "0", "--set", "listen_host=127.0.0.1", "--set", f"confdir={confdir}",
                  "--set", "flow_detail=0", "--set", "termlog_verbosity=info"]
        bare = int(procs.start(f"bare-{name}", [str(BIN / "mitmdump"), *common],
                               r"listening at 127\.0\.0\.1:(\d+)", target=True).group(1))
        self.pids = {"bare mitmdump": procs.procs[-1].pid}
        rules = workdir / f"rules-{name}"
        shutil.copytree(SHIPPED_RULES, rules)
        (rules / "identities.yaml").write_text("service_tokens: []\n")
        self.token = add_service_token(rules, "bench", ["agents"])
        gateway = int(procs.start(
            f"gateway-{name}", [str(BIN / "mitmdump"), *common, "-s", script, "--set", f"gateway_rules={rules}",
                                "--set", f"gateway_records={workdir / ('records-' + name)}"],
            r"OPENAI_BASE_URL=http://127\.0\.0\.1:(\d+)", env={"OPENAI_API_KEY": UPSTREAM_KEY}, target=True).group(1))
        self.pids["gateway"] = procs.procs[-1].pid
        self.urls = {
            "direct": f"http://127.0.0.1:{port}/v1/responses",
            "bare mitmdump": f"http://127.0.0.1:{bare}/v1/responses",
            "gateway": f"http://127.0.0.1:{gateway}/v1/responses",
        }
        if baseline:
            # Another checkout's bundle (e.g. the commit before a change), its own modules first on the path.
            checkout = str(Path(baseline).resolve().parent.parent)
            before = int(procs.start(
                f"baseline-{name}", [str(BIN / "mitmdump"), *common, "-s", baseline, "--set", f"gateway_rules={rules}",
                                     "--set", f"gateway_records={workdir / ('records-baseline-' + name)}"],
                r"OPENAI_BASE_URL=http://127\.0\.0\.1:(\d+)", env={"OPENAI_API_KEY": UPSTREAM_KEY, "PYTHONPATH": checkout},
                target=True).group(1))
            self.urls["gateway before"] = f"http://127.0.0.1:{before}/v1/responses"
            self.pids["gateway before"] = procs.procs[-1].pid
        if masking_alone:
            # The masking addon on its own (it loads alone, like every addon of the bundle): what
            # masking costs, apart from authentication, policy, recording and the audit log.
            procs.start(f"masking-{name}", [str(BIN / "mitmdump"), *common, "-s", str(ROOT / "addons" / "masking.py"),
                                            "--set", f"gateway_rules={rules}"], r"PII masking workers ready",
                        target=True)
            masking = int(_wait_for(r"listening at 127\.0\.0\.1:(\d+)", procs.workdir / f"masking-{name}.log",
                                    procs.procs[-1]).group(1))
            self.urls["masking addon"] = f"http://127.0.0.1:{masking}/v1/responses"
            self.pids["masking addon"] = procs.procs[-1].pid


def sequential(url: str, token: str, n: int) -> list[float]:
    return interleaved([url], token, n)[0]


def interleaved(urls: list[str], token: str, n: int) -> list[list[float]]:
    """Sequential requests to several targets in turn, one request each: latencies per target.

    This shared machine's slow spells last from milliseconds to seconds, which shifts a whole run of 100
    requests to one target against the next run's; taken request by request the targets share them, so a
    few per cent between two bundles stay visible (the bench's "gateway/before, interleaved" line)."""
    headers = {"authorization": f"Bearer {token}"}
    clients = [httpx.Client(timeout=30) for _ in urls]
    try:
        for _ in range(20):
            for client, url in zip(clients, urls):
                client.post(url, json=BODY, headers=headers).raise_for_status()
        latencies: list[list[float]] = [[] for _ in urls]
        turns = list(zip(clients, urls, latencies))
        for i in range(n):
            for client, url, samples in (turns if i % 2 == 0 else turns[::-1]):  # who goes first, in turn
                start = time.perf_counter()
                response = client.post(url, json=BODY, headers=headers)
                samples.append(time.perf_counter() - start)
                response.raise_for_status()
        return latencies
    finally:
        for client in clients:
            client.close()


def concurrent(url: str, token: str, clients: int, per_client: int, pid: int | None = None) -> tuple[float, float | None]:
    """(requests/s, how busy the target `pid` and its children kept their core meanwhile, or None)."""
    headers = {"authorization": f"Bearer {token}"}
    errors = []

    def worker(client: httpx.Client) -> None:
        with client:
            for _ in range(per_client):
                try:
                    client.post(url, json=BODY, headers=headers).raise_for_status()
                except Exception as e:  # counted, reported below
                    errors.append(e)

    # Made before the clock starts: each httpx.Client loads the CA bundle into an SSL context (~50 ms of
    # this core each), and eight of them inside the timed window leave the target idle for the first
    # ~0.4 s of a ~1-2 s round (what made bare mitmdump look ~60 % busy and the gateway ~80 %).
    threads = [threading.Thread(target=worker, args=(httpx.Client(timeout=30),)) for _ in range(clients)]
    cpu = _cpu_seconds(pid) if pid else 0.0
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    busy = (_cpu_seconds(pid) - cpu) / (time.perf_counter() - start) if pid else None
    if errors:
        raise SystemExit(f"{len(errors)} concurrent requests failed: {errors[0]!r}")
    return clients * per_client / elapsed, busy


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _cpu_seconds(pid: int) -> float:
    """CPU time used so far by a process and every process below it (masking workers, the flow writer)."""
    return cpu_seconds(pid)[pid]


def request_scenario(setup: Setup, args, title: str, check=None) -> None:
    size = len(httpx.post(setup.urls["direct"], json=BODY).content)
    print(f"\n== {title}: reply {size} bytes; {args.rounds} rounds of {args.requests} sequential requests and "
          f"{args.concurrency} clients x {args.per_client} requests, the three targets in turn each round")
    if check:
        check(httpx.post(setup.urls["gateway"], json=BODY, headers={"authorization": f"Bearer {setup.token}"}))
    latencies: dict[str, list[list[float]]] = {name: [] for name in setup.urls}
    rates: dict[str, list[float]] = {name: [] for name in setup.urls}
    # How busy each target keeps its core while the clients run (its processes' CPU time over the
    # wall time): a target that waits on something (a pipe, a lock, a disk) leaves the core idle, and
    # its throughput then shows the wait, not the work.
    busy: dict[str, list[float]] = {name: [] for name in setup.urls}
    pinned = bool(CORES and CORES.target)
    # Rounds take turns, so a slow spell of this shared machine weighs on every target alike; the p50
    # and throughput ratios are the medians of the rounds' own ratios (p99 needs all samples).
    paired: list[tuple[list[float], list[float]]] = []  # (gateway, gateway before) by round, interleaved
    for _ in range(args.rounds):
        if "gateway before" in setup.urls:
            paired.append(tuple(interleaved([setup.urls["gateway"], setup.urls["gateway before"]], setup.token,
                                             args.requests)))
        for name, url in setup.urls.items():
            latencies[name].append(sequential(url, setup.token, args.requests))
            rate, busy_share = concurrent(url, setup.token, args.concurrency, args.per_client, setup.pids.get(name))
            rates[name].append(rate)
            if busy_share is not None:
                busy[name].append(busy_share)
    pooled = {name: [x for round_ in rounds for x in round_] for name, rounds in latencies.items()}
    for name in setup.urls:
        lat = pooled[name]
        print(f"{name:14s} p50 {statistics.median(lat) * 1000:7.2f} ms   p99 {percentile(lat, 99) * 1000:7.2f} ms   "
              f"req/s by round {' '.join(f'{r:6.1f}' for r in rates[name])}")
    if pinned:
        print(f"core busy with the target while {args.concurrency} clients ran (CPU time of it and its child "
              "processes over wall time, median of rounds): " + ", ".join(
                  f"{name} {statistics.median(busy[name]) * 100:.0f}%" for name in setup.urls if busy[name]))
    for name in [n for n in setup.urls if n not in ("direct", "bare mitmdump")]:
        p50s = [statistics.median(t) / statistics.median(b) for t, b in zip(latencies[name], latencies["bare mitmdump"])]
        rounds = [g / b for g, b in zip(rates[name], rates["bare mitmdump"])]
        print(f"{name + '/bare:':21s} p50 {statistics.median(p50s):.2f}x   "
              f"p99 {percentile(pooled[name], 99) / percentile(pooled['bare mitmdump'], 99):.2f}x   "
              f"req/s {statistics.median(rounds):.2f}x   "
              f"(rounds: p50 {' '.join(f'{r:.2f}' for r in p50s)}; req/s {' '.join(f'{r:.2f}' for r in rounds)})")
    if "gateway before" in setup.urls:
        p50s = [statistics.median(n) / statistics.median(b)
                for n, b in zip(latencies["gateway"], latencies["gateway before"])]
        rounds = [n / b for n, b in zip(rates["gateway"], rates["gateway before"])]
        pooled_p50 = statistics.median(pooled["gateway"]) / statistics.median(pooled["gateway before"])
        print(f"{'gateway/before:':21s} p50 {statistics.median(p50s):.2f}x (all samples: {pooled_p50:.2f}x)   "
              f"req/s {statistics.median(rounds):.2f}x   (below 1 for p50, above 1 for req/s: faster than before; "
              f"rounds: p50 {' '.join(f'{r:.2f}' for r in p50s)}; req/s {' '.join(f'{r:.2f}' for r in rounds)})")
        p50s = [statistics.median(g) / statistics.median(b) for g, b in paired]
        pooled_p50 = (statistics.median([x for g, _ in paired for x in g])
                      / statistics.median([x for _, b in paired for x in b]))
        print(f"{'gateway/before, interleaved request by request:':21s} p50 {statistics.median(p50s):.3f}x "
              f"(all samples: {pooled_p50:.3f}x; rounds: {' '.join(f'{r:.2f}' for r in p50s)})")


def _stream_once(url: str, token: str) -> tuple[float, float]:
    """(seconds to the first non-empty text delta, seconds to the end of the stream)."""
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", url, json=dict(BODY, stream=True), headers={"authorization": f"Bearer {token}"},
                      timeout=30) as response:
        for line in response.iter_lines():
            if first is None and line.startswith("data: ") and '"response.output_text.delta"' in line:
                if json.loads(line[6:]).get("delta"):
                    first = time.perf_counter() - start
    return first or float("nan"), time.perf_counter() - start


def stream_scenario(setup: Setup, runs: int) -> None:
    print(f"\n== stream: 40 deltas spaced 25 ms, three personal data values; median of {runs} runs")
    results = {}
    for name, url in setup.urls.items():
        samples = [_stream_once(url, setup.token) for _ in range(runs)]
        results[name] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))
        print(f"{name:14s} first token {results[name][0] * 1000:7.1f} ms   total {results[name][1] * 1000:7.1f} ms")
    (df, dt), (gf, gt) = results["direct"], results["gateway"]
    print(f"gateway vs direct: first token +{(gf - df) * 1000:.1f} ms   total {gt / dt:.2f}x")


def analyze_scenario() -> None:
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine.no_op_nlp_engine import NoOpNlpEngine

    from auditgate.masking.config import load_masking_settings
    from auditgate.masking.engine import PiiMasker
    from tests.fake_openai import pii_reply

    ours = PiiMasker(load_masking_settings(SHIPPED_RULES))
    nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no_op"}])
    nlp.load()
    registry = RecognizerRegistry()
    registry.load_predefined_recognizers(nlp_engine=nlp)
    presidio = AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"])
    print("\n== analyze cost per KB (three personal data values per 2 KB; one core, this process)")
    print(f"{'text':>8s} {'ours ms':>10s} {'ms/KB':>8s} {'presidio defaults ms':>22s} {'ms/KB':>8s}")
    for kb in (0.2, 2, 20):
        text = pii_reply(int(kb * 1024)) if kb >= 2 else pii_reply(2048)[: int(kb * 1024)]
        if kb > 2:
            text = " ".join([pii_reply(2048)] * int(kb / 2))
        ours.mask(text, "response")
        presidio.analyze(text, language="en")
        # The best of several repeats: the least disturbed by whatever else the machine is doing.
        n = 20 if kb < 20 else 5
        mine = min(timeit.repeat(lambda: ours.mask(text, "response"), number=n, repeat=5)) / n * 1000
        k = max(1, n // 4)
        theirs = min(timeit.repeat(lambda: presidio.analyze(text, language="en"), number=k, repeat=3)) / k * 1000
        size = len(text) / 1024
        print(f"{size:7.1f}K {mine:10.2f} {mine / size:8.2f} {theirs:22.2f} {theirs / size:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["all", "plain", "pii", "stream", "analyze"], default="all")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=100, help="sequential requests per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=25, help="requests per client per round")
    parser.add_argument("--stream-runs", type=int, default=10)
    parser.add_argument("--reply-text-bytes", type=int, default=1400, help="1400 gives a ~2 KB JSON reply")
    parser.add_argument("--script", default=str(ROOT / "addons" / "gateway.py"), help="the bundle to measure")
    parser.add_argument("--no-pin", action="store_true", help="let the OS place targets, client and upstream")
    parser.add_argument("--baseline-script", default=None,
                        help="also measure another checkout's addons/gateway.py (e.g. the commit before a change)")
    args = parser.parse_args()
    global CORES
    CORES = Cores(pin=not args.no_pin)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; commit {commit.strip() or '?'}; "
          f"{time.strftime('%Y-%m-%d')}; {CORES.describe()}")

    workdir = Path(tempfile.mkdtemp(prefix="auditgate-bench-"))
    procs = Processes(workdir)
    try:
        if args.scenario in ("all", "plain"):
            setup = Setup(procs, workdir, args.script, ["--reply-bytes", str(args.reply_text_bytes)],
                          baseline=args.baseline_script)
            request_scenario(setup, args, "plain")
        if args.scenario in ("all", "pii"):
            setup = Setup(procs, workdir, args.script, ["--reply-bytes", str(args.reply_text_bytes), "--pii"],
                          masking_alone=True, baseline=args.baseline_script)

            def masked(response: httpx.Response) -> None:
                assert "jane.roe@example.org" not in response.text and "<EMAIL_ADDRESS>" in response.text

            request_scenario(setup, args, "pii (masked)", masked)
        if args.scenario in ("all", "stream"):
            setup = Setup(procs, workdir, args.script, ["--pii", "--reply-bytes", "600", "--deltas", "40",
                                                        "--event-delay", "0.025"])
            stream_scenario(setup, args.stream_runs)
        if args.scenario in ("all", "analyze"):
            analyze_scenario()
    finally:
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
