"""A lean HTTP/1.1 load generator for the benchmarks, run in a process of its own so its CPU can be measured.

N keep-alive connections, each sending the same POST over and over (one request in flight per connection), and
reading each full response (content-length framing): requests/s, and every response checked with cheap byte
tests (status 200; with --masked, the masked placeholder present and the raw e-mail address absent). An asyncio
Protocol per connection with the request bytes built once: tens of microseconds of CPU per request, where an
httpx client in a thread costs a millisecond or more, taken from the cores the targets need.

    python -m bench.load_client URL --token T --connections 8 --requests 400 --body JSON [--masked]

Talks to its parent over stdin/stdout (see LoadRun): prints READY once every connection is open, waits for a
line on stdin, runs, prints one JSON line of results, then waits for stdin to close before it exits (so the
parent can read its CPU time after the run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
# What the gateway puts where the reply held an e-mail address, and the address itself (tests.fake_openai.pii_reply).
MASKED = b"<EMAIL_ADDRESS>"
RAW_EMAIL = b"jane.roe@example.org"


class _Run:
    """What every connection shares: the request bytes, what is left to send, and the tallies."""

    def __init__(self, request: bytes, requests: int, masked: bool, connections: int) -> None:
        self.request, self.left, self.masked = request, requests, masked
        self.open = connections
        self.done = self.errors = 0
        self.first_error: str | None = None
        self.finished = asyncio.get_running_loop().create_future()
        self.started = self.ended = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = what

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.finished.done():
            self.ended = time.perf_counter()
            self.finished.set_result(None)


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # bytes of the whole response, once its head is in
        self.head_end = 0
        self.ended = False

    def connection_made(self, transport) -> None:  # asyncio turns Nagle off on TCP sockets
        self.transport = transport

    def send(self) -> None:
        if self.run.take():
            self.transport.write(self.run.request)
        else:
            self.finish()

    def finish(self) -> None:
        if not self.ended:
            self.ended = True
            self.transport.close()
            self.run.closed()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self.run.error(f"a response without content-length: {bytes(buffer[:300])!r}")
                return self.finish()
            eol = head.find(b"\r\n", at + 2)
            self.head_end = end + 4
            self.need = self.head_end + int(head[at + 17:eol if eol > 0 else None])
        if len(buffer) < self.need:
            return
        run = self.run
        body = bytes(buffer[self.head_end:self.need])
        if not buffer.startswith(b"HTTP/1.1 200 "):
            status = bytes(buffer[:buffer.find(b"\r\n")])
            run.error(f"{status.decode(errors='replace')}: {body[:300]!r}")
        elif run.masked and (MASKED not in body or RAW_EMAIL in body):
            run.error(f"a reply not masked: {body[:300]!r}")
        else:
            run.done += 1
        del buffer[:self.need]
        self.need = -1
        if buffer:
            run.error(f"bytes after a response: {bytes(buffer[:100])!r}")
            return self.finish()
        self.send()

    def connection_lost(self, exc) -> None:
        if not self.ended:
            self.run.error(f"connection lost mid-run: {exc!r}")
            self.ended = True
            self.run.closed()


def request_bytes(url: str, token: str, body: bytes) -> bytes:
    parts = urlsplit(url)
    return (f"POST {parts.path or '/'} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {token}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


async def _main(args) -> None:
    parts = urlsplit(args.url)
    loop = asyncio.get_running_loop()
    run = _Run(request_bytes(args.url, args.token, args.body.encode()), args.requests, args.masked, args.connections)
    connections = []
    for _ in range(args.connections):
        _, protocol = await loop.create_connection(lambda: _Connection(run), parts.hostname, parts.port)
        connections.append(protocol)
    print("READY", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    run.started = time.perf_counter()
    for connection in connections:
        connection.send()
    await run.finished
    print(json.dumps({"requests": run.done, "errors": run.errors, "first_error": run.first_error,
                      "seconds": run.ended - run.started}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="http://host:port/path (plain HTTP)")
    parser.add_argument("--token", required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="in all, shared among the connections")
    parser.add_argument("--body", required=True, help="the JSON body to POST")
    parser.add_argument("--masked", action="store_true", help="check each reply is masked")
    args = parser.parse_args()
    asyncio.run(_main(args))
    sys.stdin.read()  # the parent reads this process's CPU time, then closes stdin


class LoadRun:
    """One run of the load generator in a child process: connected when made, measured between go() and close()."""

    def __init__(self, url: str, token: str, connections: int, requests: int, body: bytes, masked: bool,
                 timeout: float = 30) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.load_client", url, "--token", token, "--connections", str(connections),
             "--requests", str(requests), "--body", body.decode(), *(["--masked"] if masked else [])],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.close()
            raise SystemExit(f"the load generator did not connect to {url}: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> dict:
        """Run; the result once every request is answered: requests, errors, first_error, seconds, rate."""
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the load generator died (exit {self.proc.wait()})")
        result = json.loads(line)
        result["rate"] = result["requests"] / result["seconds"] if result["seconds"] else 0.0
        return result

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)


if __name__ == "__main__":
    main()
