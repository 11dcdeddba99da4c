"""Benchmark: a ~2 KB Responses API reply direct, through bare mitmdump and through the gateway, in one run.

Run with the project's venv: .venv/bin/python bench/bench_gateway.py [--requests 500] [--concurrency 8]
Prints p50/p99 latency of sequential requests, requests/s with concurrent clients, and gateway/bare ratios.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from addons.identity import add_service_token  # noqa: E402

BIN = Path(sys.executable).parent
BODY = {"model": "gpt-test", "input": "Summarise the quarterly report in two paragraphs."}
UPSTREAM_KEY = "sk-bench-upstream-key-0123456789abcdef"


def _wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout: float = 30) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited early:\n{log.read_text()}")
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r} in {log}")


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir, self.procs = workdir, []

    def start(self, name: str, args: list[str], pattern: str, env: dict | None = None) -> re.Match:
        log = self.workdir / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        full_env.update(env or {})
        with open(log, "wb") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                                    start_new_session=True)
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


def sequential(url: str, token: str, n: int) -> list[float]:
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(timeout=30) as client:
        for _ in range(20):  # warm up connections and caches
            client.post(url, json=BODY, headers=headers).raise_for_status()
        latencies = []
        for _ in range(n):
            start = time.perf_counter()
            response = client.post(url, json=BODY, headers=headers)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
    return latencies


def concurrent(url: str, token: str, clients: int, per_client: int) -> float:
    headers = {"authorization": f"Bearer {token}"}
    errors = []

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(per_client):
                try:
                    client.post(url, json=BODY, headers=headers).raise_for_status()
                except Exception as e:  # counted, reported below
                    errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} concurrent requests failed: {errors[0]!r}")
    return clients * per_client / elapsed


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=100)
    parser.add_argument("--reply-text-bytes", type=int, default=1400, help="1400 gives a ~2 KB JSON reply")
    parser.add_argument("--script", default=str(ROOT / "addons" / "gateway.py"), help="the bundle to measure")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="auditgate-bench-"))
    procs = Processes(workdir)
    try:
        upstream_port = int(procs.start(
            "upstream", [sys.executable, "-m", "tests.fake_openai", "--reply-bytes", str(args.reply_text_bytes)],
            r"PORT (\d+)").group(1))
        target = f"reverse:http://127.0.0.1:{upstream_port}"
        confdir = workdir / "confdir"
        bare_port = int(procs.start(
            "bare", [str(BIN / "mitmdump"), "--mode", target, "-p", "0", "--set", "listen_host=127.0.0.1",
                     "--set", f"confdir={confdir}", "--set", "flow_detail=0", "--set", "termlog_verbosity=info"],
            r"listening at 127\.0\.0\.1:(\d+)").group(1))
        rules = workdir / "rules"
        shutil.copytree(ROOT / "rules", rules)
        (rules / "identities.yaml").write_text("service_tokens: []\n")
        token = add_service_token(rules, "bench", ["agents"])
        gateway_port = int(procs.start(
            "gateway", [str(BIN / "mitmdump"), "--mode", target, "-p", "0", "--set", "listen_host=127.0.0.1",
                        "--set", f"confdir={confdir}", "-s", args.script,
                        "--set", f"gateway_rules={rules}", "--set", f"gateway_records={workdir / 'records'}",
                        "--set", "flow_detail=0", "--set", "termlog_verbosity=info"],
            r"OPENAI_BASE_URL=http://127\.0\.0\.1:(\d+)", env={"OPENAI_API_KEY": UPSTREAM_KEY}).group(1))

        targets = {
            "direct": f"http://127.0.0.1:{upstream_port}/v1/responses",
            "bare mitmdump": f"http://127.0.0.1:{bare_port}/v1/responses",
            "gateway": f"http://127.0.0.1:{gateway_port}/v1/responses",
        }
        size = len(httpx.post(targets["direct"], json=BODY).content)
        print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; reply {size} bytes; "
              f"{args.requests} sequential requests; {args.concurrency} clients x {args.per_client} requests")
        results = {}
        for name, url in targets.items():
            latencies = sequential(url, token, args.requests)
            rps = concurrent(url, token, args.concurrency, args.per_client)
            results[name] = (statistics.median(latencies), percentile(latencies, 99), rps)
            p50, p99, rps = results[name]
            print(f"{name:14s} p50 {p50 * 1000:7.2f} ms   p99 {p99 * 1000:7.2f} ms   {rps:8.1f} req/s")
        gp50, gp99, grps = results["gateway"]
        bp50, bp99, brps = results["bare mitmdump"]
        print(f"gateway/bare: p50 {gp50 / bp50:.2f}x   p99 {gp99 / bp99:.2f}x   req/s {grps / brps:.2f}x")
        recorded = sum(p.stat().st_size for p in (workdir / "records" / "flows").glob("*.mitm"))
        print(f"gateway recorded {recorded / 1e6:.1f} MB of flows")
    finally:
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
