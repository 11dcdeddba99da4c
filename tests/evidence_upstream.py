"""A local upstream for the evidence tests: slow replies (requests stay in flight), and streams it cuts mid-way."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.fake_openai import FakeOpenAI


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EvidenceUpstream

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        upstream = self.server
        if len(body) < length:
            # The sender died between the request's head and its body (a kill -9 of the gateway): no request
            # reached this upstream whole, so none is counted as received.
            self.close_connection = True
            return
        with upstream.lock:
            upstream.received.append(hashlib.sha256(body).hexdigest())
            upstream.in_flight += 1
        try:
            request = json.loads(body or b"{}")
            if request.get("stream"):
                self._cut_stream(request)
            else:
                time.sleep(upstream.delay)  # in flight meanwhile: a kill -9 of the gateway leaves it unanswered
                data = json.dumps(FakeOpenAI(reply_text="Slow answer.").responses_json(request)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
        finally:
            with upstream.lock:
                upstream.in_flight -= 1
                upstream.answered += 1

    def _cut_stream(self, request: dict) -> None:
        """Three events of a Responses stream, then the connection is reset: no last chunk, no end."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        events = list(FakeOpenAI(reply_text="Cut short after a few words.").responses_events(request))
        for event, payload in events[: self.server.events_before_cut]:
            data = f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
            time.sleep(0.05)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True  # closed with SO_LINGER 0: a reset mid-stream


class EvidenceUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float = 0.6, events_before_cut: int = 4) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay, self.events_before_cut = delay, events_before_cut
        self.lock = threading.Lock()
        self.received: list[str] = []  # SHA-256 of each request body, as received
        self.in_flight = 0
        self.answered = 0

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> EvidenceUpstream:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
