"""A local upstream that hands back the key it was sent, everywhere a reply can carry it.

It speaks HTTP/1.1 (plain) or HTTP/2 (TLS, ALPN h2) and answers OpenAI-shaped requests with the
``FakeOpenAI`` payloads, steered by a marker in the request body:

- ``echo-headers``: the key in ``x-request-id``, an ``x-echo-authorization`` header, ``openai-organization``,
  and quoted in the JSON reply's text (an error message that repeats the credential would do the same);
- ``redirect``: a 302 whose ``Location`` carries the key as a query parameter;
- ``slow``: the reply waits until ``release()`` (a request in flight, for mitmweb to look at);
- ``gzip``: the reply gzip-compressed whatever the request asked for (streams too, as one gzip stream);
- ``"stream": true``: an event stream whose text spells the key over several deltas, written in
  network chunks that also cut through it, plus the key whole in a comment, an ``id:`` line and an
  unknown event.

Every request is kept (method, path, headers) so a test can see what the gateway forwarded.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h2.config
import h2.connection
import h2.events

from tests.fake_openai import FakeOpenAI, ReceivedRequest


def key_of(headers: dict[str, str]) -> str:
    value = headers.get("authorization", "") or headers.get("api-key", "")
    return value.removeprefix("Bearer ").strip()


class EchoBehaviour:
    """What the upstream answers, shared by its HTTP/1 and HTTP/2 faces."""

    def __init__(self) -> None:
        self.fake = FakeOpenAI(deltas=7)
        self.received: list[ReceivedRequest] = []
        self.released = threading.Event()
        self.arrived = threading.Event()  # a slow request has arrived

    def release(self) -> None:
        self.released.set()

    def reply(self, method: str, path: str, headers: dict[str, str], body: bytes):
        """(status, headers, chunks, pause between chunks)."""
        self.received.append(ReceivedRequest(method, path, headers, body))
        key = key_of(headers)
        request = json.loads(body or b"{}") if method == "POST" else {}
        raw = json.dumps(request)
        json_headers = [("content-type", "application/json")]
        if "slow" in raw:
            self.arrived.set()
            self.released.wait(30)
        if "redirect" in raw:
            return 302, [("location", f"http://127.0.0.1:9/callback?k={key}&state=1"), ("content-length", "0")], [], 0
        if path.rstrip("/").endswith("/models"):
            return 200, json_headers, [json.dumps({"object": "list", "data": []}).encode()], 0
        if request.get("stream"):
            self.fake.reply_text = f"Your key is {key} - keep it safe."
            events = [(name, payload) for name, payload in self.fake.responses_events(request)]
            text = "".join(f"event: {name}\ndata: {json.dumps(payload)}\n\n" for name, payload in events)
            text = f": debug {key}\n\n" + f"id: {key}\nevent: x.debug\ndata: {json.dumps({'type': 'x.debug', 'seen': key})}\n\n" + text
            data = text.encode()
            # Chunk boundaries that cut the key's bytes where it stands whole (the comment line).
            cut = data.index(key.encode()) + len(key) // 2
            chunks = [data[:cut]] + [data[i:i + 97] for i in range(cut, len(data), 97)]
            headers = [("content-type", "text/event-stream; charset=utf-8"), ("x-request-id", key)]
            if "gzip" in raw:
                data = gzip.compress(data)
                chunks = [data[i:i + 97] for i in range(0, len(data), 97)]
                headers.append(("content-encoding", "gzip"))
            return 200, headers, chunks, 0.002
        self.fake.reply_text = f"Hello. The key you sent is {key}."
        payload = self.fake.responses_json(request) if path.endswith("/responses") else {"ok": True, "key": key}
        extra = []
        if "echo-headers" in raw:
            extra = [("x-request-id", key), ("x-echo-authorization", f"Bearer {key}"), ("openai-organization", key)]
        if "gzip" in raw:
            return 200, [*json_headers, *extra, ("content-encoding", "gzip")], [gzip.compress(json.dumps(payload).encode())], 0
        return 200, json_headers + extra, [json.dumps(payload).encode()], 0


# ---- HTTP/1.1 ------------------------------------------------------------------------------------------------
class _Http1Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: "Http1EchoUpstream"

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, reply_headers, chunks, pause = self.server.behaviour.reply(self.command, self.path, headers, body)
        self.send_response(status)
        streamed = any(name == "content-type" and "event-stream" in value for name, value in reply_headers)
        for name, value in reply_headers:
            self.send_header(name, value)
        if streamed:
            self.send_header("transfer-encoding", "chunked")
        elif status != 302:
            self.send_header("content-length", str(sum(len(c) for c in chunks)))
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if streamed else chunk)
            self.wfile.flush()
            time.sleep(pause)
        if streamed:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    do_GET = do_POST = _handle


class Http1EchoUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behaviour: EchoBehaviour | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Http1Handler)
        self.behaviour = behaviour or EchoBehaviour()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> "Http1EchoUpstream":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.behaviour.release()
        self.shutdown()
        self.server_close()


# ---- HTTP/2 over TLS -------------------------------------------------------------------------------------------
class Http2EchoUpstream:
    """The same answers over HTTP/2 (TLS with ALPN h2 only), one thread per connection."""

    def __init__(self, cert: str, key: str, behaviour: EchoBehaviour | None = None) -> None:
        self.behaviour = behaviour or EchoBehaviour()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.set_alpn_protocols(["h2"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.alpn: list[str | None] = []
        self._stopped = False

    def start(self) -> "Http2EchoUpstream":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self.behaviour.release()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            sock = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.alpn.append(sock.selected_alpn_protocol())
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        lock = threading.Lock()
        sock.sendall(conn.data_to_send())
        pending: dict[int, dict] = {}
        try:
            while True:
                data = sock.recv(65535)
                if not data:
                    return
                with lock:
                    events = conn.receive_data(data)
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        pending[event.stream_id] = {"headers": dict(event.headers), "body": b""}
                    elif isinstance(event, h2.events.DataReceived):
                        pending[event.stream_id]["body"] += event.data
                        with lock:
                            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        request = pending.pop(event.stream_id)
                        threading.Thread(target=self._respond, args=(conn, lock, sock, event.stream_id, request),
                                         daemon=True).start()
                with lock:
                    sock.sendall(conn.data_to_send())
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            return
        finally:
            sock.close()

    def _respond(self, conn, lock, sock, stream_id: int, request: dict) -> None:
        headers = request["headers"]
        regular = {k: v for k, v in headers.items() if not k.startswith(":")}
        status, reply_headers, chunks, pause = self.behaviour.reply(headers[":method"], headers[":path"], regular,
                                                                    request["body"])
        reply_headers = [(k, v) for k, v in reply_headers if k != "content-length"]
        try:
            with lock:
                conn.send_headers(stream_id, [(":status", str(status)), *reply_headers], end_stream=not chunks)
                sock.sendall(conn.data_to_send())
            for i, chunk in enumerate(chunks):
                with lock:
                    conn.send_data(stream_id, chunk, end_stream=i == len(chunks) - 1)
                    sock.sendall(conn.data_to_send())
                time.sleep(pause)
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
