"""A demo upstream: a small OpenAI-compatible API on 127.0.0.1 whose replies hold personal data.

It is a demo, not a model: it accepts **any** bearer key (a request without one gets 401, as from
OpenAI, so the gateway's key custody shows), ignores the model name, and answers every prompt with the
same made-up customer record (a name, an email address, a phone number and a card number), so the
gateway in front of it has something to mask. Served:

- ``POST /v1/chat/completions`` and ``POST /v1/responses``, JSON or, with ``"stream": true``, server-sent
  events in the shapes OpenAI sends (``chat.completion.chunk`` then ``[DONE]``; ``response.created`` ...
  ``response.output_text.delta`` ... ``response.completed``), spaced ``--event-delay`` seconds apart so a
  stream is seen to stream;
- ``GET /v1/models``.

Run it alone with ``python -m auditgate.demo.upstream --port 8900`` (``--port 0``: a free port); it prints
``auditgate demo upstream listening on http://127.0.0.1:N/v1`` once it listens, and logs one line per
request to stderr. With ``--certfile cert.pem --keyfile key.pem`` it serves HTTPS instead (a stand-in for a
local model server with a self-signed certificate, for forward mode: docs/first-run.md). ``./run_gateway.sh --demo`` starts it with the gateway in front (docs/first-run.md).
Standard library only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import ssl
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "demo-model"
# Made-up values: 4111 1111 1111 1111 is a well-known test card number, 555-01xx numbers are fictional.
REPLY_TEXT = ("Here is the customer record you asked for. Name: Jane Roe. Email: jane.roe@example.com. "
              "Phone: +1 415-555-0100. Card: 4111 1111 1111 1111. Anything else?")
DELTAS = 16

_ids = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}_demo{next(_ids):06d}"


def split_text(text: str, pieces: int) -> list[str]:
    """text in at most `pieces` deltas, cut at spaces where possible (as a model's tokens would be)."""
    words = text.split(" ")
    per = max(1, -(-len(words) // max(1, pieces)))
    chunks = [" ".join(words[i:i + per]) for i in range(0, len(words), per)]
    return [chunk + (" " if i < len(chunks) - 1 else "") for i, chunk in enumerate(chunks)]


def _usage_responses() -> dict:
    return {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 40,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 52}


def _usage_chat() -> dict:
    return {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}


# ---- Responses API -------------------------------------------------------------------------------
def _response(model: str, output: list, status: str) -> dict:
    return {
        "id": _id("resp"), "object": "response", "created_at": int(time.time()), "status": status,
        "model": model, "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "error": None, "incomplete_details": None, "instructions": None, "metadata": {}, "temperature": 1.0,
        "top_p": 1.0, "text": {"format": {"type": "text"}}, "truncation": "disabled",
        "usage": _usage_responses() if status == "completed" else None,
    }


def _message(text: str, status: str = "completed") -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": _id("msg"), "status": status, "role": "assistant", "content": content}


def responses_json(body: dict, text: str = REPLY_TEXT) -> dict:
    return _response(body.get("model") or MODEL, [_message(text)], "completed")


def responses_events(body: dict, text: str = REPLY_TEXT, deltas: int = DELTAS) -> Iterator[tuple[str, dict]]:
    seq = itertools.count()
    response = _response(body.get("model") or MODEL, [], "in_progress")
    yield "response.created", {"type": "response.created", "sequence_number": next(seq), "response": response}
    yield "response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq), "response": response}
    item = _message("", status="in_progress")
    where = {"item_id": item["id"], "output_index": 0}
    yield "response.output_item.added", {"type": "response.output_item.added", "sequence_number": next(seq),
                                         "output_index": 0, "item": dict(item)}
    yield "response.content_part.added", {"type": "response.content_part.added", "sequence_number": next(seq),
                                          **where, "content_index": 0,
                                          "part": {"type": "output_text", "text": "", "annotations": []}}
    for piece in split_text(text, deltas):
        yield "response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": next(seq),
                                             **where, "content_index": 0, "delta": piece, "logprobs": []}
    yield "response.output_text.done", {"type": "response.output_text.done", "sequence_number": next(seq),
                                        **where, "content_index": 0, "text": text, "logprobs": []}
    part = {"type": "output_text", "text": text, "annotations": []}
    yield "response.content_part.done", {"type": "response.content_part.done", "sequence_number": next(seq),
                                         **where, "content_index": 0, "part": part}
    item = dict(item, status="completed", content=[part])
    yield "response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(seq),
                                        "output_index": 0, "item": item}
    done = dict(response, status="completed", output=[item], usage=_usage_responses())
    yield "response.completed", {"type": "response.completed", "sequence_number": next(seq), "response": done}


# ---- Chat Completions ----------------------------------------------------------------------------
def chat_json(body: dict, text: str = REPLY_TEXT) -> dict:
    return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": _usage_chat()}


def chat_chunks(body: dict, text: str = REPLY_TEXT, deltas: int = DELTAS) -> Iterator[dict]:
    base = {"id": _id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": body.get("model") or MODEL}

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}])

    yield chunk({"role": "assistant", "content": ""})
    for piece in split_text(text, deltas):
        yield chunk({"content": piece})
    yield chunk({}, "stop")
    if (body.get("stream_options") or {}).get("include_usage"):
        yield dict(base, choices=[], usage=_usage_chat())


# ---- HTTP ----------------------------------------------------------------------------------------
def _error(message: str, kind: str, code: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    server: DemoUpstream

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"demo upstream: {self.address_string()} {format % args}\n")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Which key came with the request (its start only): behind the gateway, the gateway's own key,
        # never the caller's token.
        headers = getattr(self, "headers", None)  # absent when the request line itself was bad
        key = (headers.get("authorization") or "").partition(" ")[2] if headers else ""
        shown = f"key {key[:18]}…" if key.strip() else "no key"
        self.log_message('"%s" %s (%s)', self.requestline, str(code), shown)

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-request-id", _id("req"))
        self.end_headers()
        self.wfile.write(data)

    def _send_sse(self, events: Iterable[tuple[str | None, Any]]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("x-request-id", _id("req"))
        self.end_headers()
        for i, (event, payload) in enumerate(events):
            if i and self.server.event_delay:
                time.sleep(self.server.event_delay)
            data = payload if isinstance(payload, str) else json.dumps(payload)
            text = (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
            raw = text.encode()
            self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _authorized(self) -> bool:
        scheme, _, key = (self.headers.get("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return True  # any key: this is a demo
        self._send_json(401, _error("no API key: send 'Authorization: Bearer <any key>' (the gateway sends its own)",
                                    "invalid_request_error", "invalid_api_key"))
        return False

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self) -> None:
        self.server.received.append(("GET", self.path))
        path = self._path()
        if path in ("", "/v1"):
            self._send_json(200, {"object": "auditgate.demo", "message": "auditgate demo upstream: POST /v1/responses, "
                                  "POST /v1/chat/completions, GET /v1/models"})
        elif not self._authorized():
            return
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                              "owned_by": "auditgate-demo"}]})
        elif path == f"/v1/models/{MODEL}":
            self._send_json(200, {"id": MODEL, "object": "model", "created": 0, "owned_by": "auditgate-demo"})
        else:
            self._send_json(404, _error(f"no route GET {path}", "invalid_request_error", "not_found"))

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.received.append(("POST", self.path))
        if not self._authorized():
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send_json(400, _error("the body must be a JSON object", "invalid_request_error", "invalid_json"))
            return
        path, text, deltas = self._path(), self.server.reply_text, self.server.deltas
        if path == "/v1/responses":
            if body.get("stream"):
                self._send_sse(responses_events(body, text, deltas))
            else:
                self._send_json(200, responses_json(body, text))
        elif path == "/v1/chat/completions":
            if body.get("stream"):
                self._send_sse([*((None, c) for c in chat_chunks(body, text, deltas)), (None, "[DONE]")])
            else:
                self._send_json(200, chat_json(body, text))
        else:
            self._send_json(404, _error(f"no route POST {path}", "invalid_request_error", "not_found"))


class DemoUpstream(ThreadingHTTPServer):
    """The demo upstream on 127.0.0.1 (port 0: a free one); start() serves it in a thread, or serve_forever()."""

    daemon_threads = True

    def __init__(self, port: int = 0, *, reply_text: str = REPLY_TEXT, deltas: int = DELTAS,
                 event_delay: float = 0.05, quiet: bool = False, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.ssl_context = ssl_context
        self.reply_text, self.deltas, self.event_delay, self.quiet = reply_text, deltas, event_delay, quiet
        self.received: list[tuple[str, str]] = []  # (method, path) of each request, for a look at what got through
        self._thread: threading.Thread | None = None

    def get_request(self):
        sock, address = super().get_request()
        if self.ssl_context:  # the handshake runs in the request's thread, on first read
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request, client_address) -> None:
        error = sys.exception()
        if isinstance(error, ssl.SSLError):  # e.g. a client that does not trust the self-signed certificate
            if not self.quiet:
                sys.stderr.write(f"demo upstream: {client_address[0]}: TLS: {error}\n")
        elif not isinstance(error, ConnectionError):  # a client that went away is no error
            super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> DemoUpstream:
        self._thread = threading.Thread(target=self.serve_forever, name="auditgate-demo-upstream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auditgate.demo.upstream",
                                     description="A demo OpenAI-compatible upstream on 127.0.0.1 (any bearer key).")
    parser.add_argument("--port", type=int, default=8900, help="port on 127.0.0.1 (0: a free one; default 8900)")
    parser.add_argument("--event-delay", type=float, default=0.05, help="seconds between streamed events")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    parser.add_argument("--certfile", help="serve HTTPS with this certificate (PEM; e.g. a self-signed one)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    args = parser.parse_args(argv)
    context = None
    if args.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(args.certfile, args.keyfile)
        except (OSError, ssl.SSLError) as e:
            print(f"auditgate demo upstream: cannot load {args.certfile}: {e}", file=sys.stderr)
            return 2
    try:
        server = DemoUpstream(args.port, event_delay=args.event_delay, quiet=args.quiet, ssl_context=context)
    except OSError as e:
        print(f"auditgate demo upstream: cannot listen on 127.0.0.1:{args.port}: {e}", file=sys.stderr)
        return 2
    print(f"auditgate demo upstream listening on {server.url}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
