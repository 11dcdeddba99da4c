"""A local upstream that misbehaves on request, for the body-limit and timeout tests; bombs to send it or from it.

The request's JSON ``model`` picks the behaviour: ``gzip-bomb-reply`` (a 1 MB gzip reply that inflates
to 1 GB), ``silent`` (reads the request, never answers), ``stall-after-headers`` (sends a JSON reply's
head and part of its body, then nothing), ``sse-stall`` (two events of a stream, then nothing),
``sse-flood`` (an event stream of ``flood_bytes``); any other model gets the ordinary fake reply
(``tests.fake_openai``). Every request is logged in ``received`` before it is answered, or not.
"""

from __future__ import annotations

import functools
import gzip
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import brotli

from tests.fake_openai import FakeOpenAI, ReceivedRequest

try:  # Python 3.14 has it in the standard library; the backport before
    from compression import zstd
except ImportError:
    from backports import zstd

GB = 1024 ** 3
MB = 1024 ** 2


@functools.cache
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GB of zeros: 64 members of 16 MB each (RFC 1952 allows many)."""
    return gzip.compress(bytes(16 * MB), 9) * 64


@functools.cache
def zstd_bomb() -> bytes:
    """zstd frames inflating to 1 GB of zeros in all."""
    return zstd.compress(bytes(16 * MB)) * 64


@functools.cache
def brotli_bomb() -> bytes:
    """One brotli stream inflating to 256 MB of zeros (one stream: brotli has no members to repeat)."""
    compressor = brotli.Compressor(quality=5)
    zeros = bytes(MB)
    return b"".join([*(compressor.process(zeros) for _ in range(256)), compressor.finish()])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MisbehavingUpstream

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body_bytes = self.rfile.read(int(self.headers.get("content-length") or 0))
        upstream = self.server
        upstream.received.append(ReceivedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                                 body_bytes))
        body = json.loads(body_bytes or b"{}")
        behaviour = body.get("model", "")
        if behaviour == "gzip-bomb-reply":
            self._head(200, "application/json", {"content-encoding": "gzip", "content-length": str(len(gzip_bomb()))})
            self.wfile.write(gzip_bomb())
        elif behaviour == "silent":
            upstream.released.wait(60)
            self.close_connection = True
        elif behaviour == "stall-after-headers":
            self._head(200, "application/json", {"content-length": "1000"})
            self.wfile.write(b'{"id": "resp_stalled", "object": "response", "output": [')
            self.wfile.flush()
            upstream.released.wait(60)
            self.close_connection = True
        elif behaviour == "sse-stall":
            self._head(200, "text/event-stream", {"transfer-encoding": "chunked"})
            for event, payload in list(FakeOpenAI().responses_events(body))[:2]:
                self._chunk(f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode())
            upstream.released.wait(60)
            self.close_connection = True
        elif behaviour == "sse-flood":
            self._head(200, "text/event-stream", {"transfer-encoding": "chunked"})
            delta = {"type": "response.output_text.delta", "sequence_number": 0, "item_id": "msg_1", "output_index": 0,
                     "content_index": 0, "delta": "x" * 8000, "logprobs": []}
            event = f"event: response.output_text.delta\ndata: {json.dumps(delta)}\n\n".encode()
            try:
                for _ in range(upstream.flood_bytes // len(event) + 1):
                    self._chunk(event)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the gateway hung up once the cap was passed
                self.close_connection = True
        else:
            self._json(200, FakeOpenAI().responses_json(body))

    def _head(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self._head(status, "application/json", {"content-length": str(len(data))})
        self.wfile.write(data)


class MisbehavingUpstream(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[ReceivedRequest] = []
        self.released = threading.Event()  # set at stop: the silent and stalled handlers end
        self.flood_bytes = 4 * MB

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> MisbehavingUpstream:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


class UnreachableUpstream:
    """A port whose connects never complete: a listener that never accepts, its accept queue kept full."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self._fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self._fillers.append(filler)

    def close(self) -> None:
        for s in [*self._fillers, self.listener]:
            s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    """The process's resident set (VmRSS) in KB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
