"""Benchmark: a streamed reply over WebSocket, direct vs bare mitmdump vs the gateway, with ratios.

Run with the project's venv: .venv/bin/python bench/bench_websocket.py [--api responses|realtime|both] [--runs 8]

Each target gets one WebSocket session (the point of the transport: one persistent connection), then
`--runs` replies in turn over it, the three targets taking turns run by run so a slow spell of the
machine weighs on all alike. A reply is 40 deltas spaced 25 ms apart holding three personal data
values (tests/fake_websocket_upstream.py run alone); the gateway masks them. Measured from sending the
client event (`response.create`; Realtime: `conversation.item.create` + `response.create`):

- first delta: the first non-empty text delta (through the gateway: the first MASKED delta);
- total: the end of the response (`response.completed` / `response.done`).

Issue 13's targets: gateway first masked delta <= direct + 60 ms; total <= 1.1x direct.
The gateway is checked to have masked the reply (no raw e-mail address, a <EMAIL_ADDRESS> placeholder).

Pinned like bench/bench_gateway.py: the targets (bare mitmdump, the gateway and every process it starts)
on one core, this client and the upstream on the other; --no-pin turns it off. Takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.bench_gateway as bench_gateway  # noqa: E402  (its process handling, pinning and offline Presidio)
from auditgate.core.shipped import SHIPPED_RULES  # noqa: E402
from auditgate.identity.service_tokens import add_service_token  # noqa: E402
from bench.bench_gateway import BIN, UPSTREAM_KEY, Cores, Processes  # noqa: E402

RAW_EMAIL = "jane.roe@example.org"
TEXT_DELTAS = {"response.output_text.delta", "response.output_audio_transcript.delta"}
DONE = {"response.completed", "response.done", "response.failed", "response.incomplete"}


class Targets:
    """The WebSocket upstream, bare mitmdump and the gateway (both reverse mode to that upstream)."""

    def __init__(self, procs: Processes, workdir: Path, script: str, deltas: int, delay: float) -> None:
        port = int(procs.start("upstream", [sys.executable, "-m", "tests.fake_websocket_upstream", "--pii",
                                            "--reply-bytes", "600", "--deltas", str(deltas),
                                            "--event-delay", str(delay)], r"PORT (\d+)").group(1))
        common = ["--mode", f"reverse:http://127.0.0.1:{port}", "-p", "0", "--set", "listen_host=127.0.0.1",
                  "--set", f"confdir={workdir / 'confdir'}", "--set", "flow_detail=0",
                  "--set", "termlog_verbosity=info"]
        bare = int(procs.start("bare", [str(BIN / "mitmdump"), *common], r"listening at 127\.0\.0\.1:(\d+)",
                               target=True).group(1))
        rules = workdir / "rules"
        shutil.copytree(SHIPPED_RULES, rules)
        (rules / "identities.yaml").write_text("service_tokens: []\n")
        self.token = add_service_token(rules, "bench", ["agents"])
        gateway = int(procs.start(
            "gateway", [str(BIN / "mitmdump"), *common, "-s", script, "--set", f"gateway_rules={rules}",
                        "--set", f"gateway_records={workdir / 'records'}"],
            r"OPENAI_BASE_URL=http://127\.0\.0\.1:(\d+)", env={"OPENAI_API_KEY": UPSTREAM_KEY}, target=True).group(1))
        self.bases = {"direct": f"ws://127.0.0.1:{port}/v1", "bare mitmdump": f"ws://127.0.0.1:{bare}/v1",
                      "gateway": f"ws://127.0.0.1:{gateway}/v1"}


class Session:
    """One open WebSocket session to a target, replying to one client turn at a time."""

    def __init__(self, base: str, token: str, api: str) -> None:
        self.api = api
        path = "/responses" if api == "responses" else "/realtime?model=gpt-realtime"
        start = time.perf_counter()
        self.ws: ClientConnection = connect(base + path, additional_headers={"authorization": f"Bearer {token}"},
                                            compression=None, max_size=None, proxy=None, open_timeout=30)
        if api == "realtime":
            self._until("session.created")
            self.ws.send(json.dumps({"type": "session.update",
                                     "session": {"type": "realtime", "output_modalities": ["text"]}}))
            self._until("session.updated")
        self.connect_seconds = time.perf_counter() - start

    def _until(self, kind: str) -> dict:
        while True:
            event = json.loads(self.ws.recv(timeout=30))
            if event.get("type") == "error":
                raise RuntimeError(f"error event: {event}")
            if event.get("type") == kind:
                return event

    def turn(self) -> tuple[float, float, str]:
        """(seconds to the first non-empty text delta, seconds to the end of the response, the text)."""
        prompt = "Summarise the quarterly report in two paragraphs."
        start = time.perf_counter()
        if self.api == "responses":
            self.ws.send(json.dumps({"type": "response.create", "model": "gpt-test", "input": prompt}))
        else:
            self.ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]}}))
            self.ws.send(json.dumps({"type": "response.create"}))
        first, text = None, []
        while True:
            event = json.loads(self.ws.recv(timeout=30))
            kind = event.get("type")
            if kind == "error":
                raise RuntimeError(f"error event: {event}")
            if kind in TEXT_DELTAS and event.get("delta"):
                first = first if first is not None else time.perf_counter() - start
                text.append(event["delta"])
            elif kind in DONE:
                return first or float("nan"), time.perf_counter() - start, "".join(text)

    def close(self) -> None:
        self.ws.close()


def scenario(targets: Targets, api: str, runs: int) -> dict[str, tuple[float, float]]:
    print(f"\n== {api}: one session per target, {runs} replies each (after 2 warm-up replies), targets in turn")
    sessions: dict[str, Session] = {}
    for name, base in targets.bases.items():
        try:
            sessions[name] = Session(base, targets.token, api)
        except Exception as e:  # reported, the other targets still measured
            print(f"{name:14s} could not open a session: {type(e).__name__}: {str(e)[:160]}")
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in sessions}
    texts: dict[str, str] = {}
    for round_ in range(runs + 2):
        for name, session in sessions.items():
            first, total, text = session.turn()
            texts[name] = text
            if round_ >= 2:
                samples[name].append((first, total))
    for session in sessions.values():
        session.close()
    if "gateway" in texts:
        masked = RAW_EMAIL not in texts["gateway"] and "<EMAIL_ADDRESS>" in texts["gateway"]
        print(f"gateway reply masked: {'yes' if masked else 'NO (raw personal data reached the client)'}")
    results = {}
    for name, values in samples.items():
        results[name] = (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        print(f"{name:14s} connect {sessions[name].connect_seconds * 1000:7.1f} ms   "
              f"first delta {results[name][0] * 1000:7.1f} ms   total {results[name][1] * 1000:7.1f} ms")
    if "direct" in results:
        df, dt = results["direct"]
        for name in [n for n in results if n != "direct"]:
            f, t = results[name]
            verdict = ""
            if name == "gateway":
                verdict = (f"   targets: first <= +60 ms {'met' if f - df <= 0.060 else 'MISSED'}, "
                           f"total <= 1.1x {'met' if t / dt <= 1.1 else 'MISSED'}")
            print(f"{name + ' vs direct:':25s} first delta +{(f - df) * 1000:.1f} ms ({f / df:.2f}x)   "
                  f"total {t / dt:.3f}x{verdict}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", choices=["responses", "realtime", "both"], default="both")
    parser.add_argument("--runs", type=int, default=8, help="measured replies per target and API")
    parser.add_argument("--deltas", type=int, default=40)
    parser.add_argument("--event-delay", type=float, default=0.025)
    parser.add_argument("--script", default=str(ROOT / "addons" / "gateway.py"), help="the bundle to measure")
    parser.add_argument("--no-pin", action="store_true", help="let the OS place targets, client and upstream")
    args = parser.parse_args()
    bench_gateway.CORES = cores = Cores(pin=not args.no_pin)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
          f"commit {commit.strip() or '?'}; {time.strftime('%Y-%m-%d')}; {cores.describe()}")
    print(f"reply: {args.deltas} deltas spaced {args.event_delay * 1000:.0f} ms, three personal data values")
    workdir = Path(tempfile.mkdtemp(prefix="auditgate-bench-ws-"))
    procs = Processes(workdir)
    try:
        targets = Targets(procs, workdir, args.script, args.deltas, args.event_delay)
        for api in (["responses", "realtime"] if args.api == "both" else [args.api]):
            scenario(targets, api, args.runs)
    finally:
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
