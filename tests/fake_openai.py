"""A local OpenAI-compatible upstream for tests: Responses and Chat Completions (JSON and SSE), embeddings,
a function-tool round trip, configurable reply text and event spacing, and a log of what it received."""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import ssl
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ids = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}"


def split_text(text: str, pieces: int) -> list[str]:
    """Split text into `pieces` non-empty deltas (fewer if the text is shorter)."""
    pieces = max(1, min(pieces, len(text)))
    size, rest = divmod(len(text), pieces)
    out, pos = [], 0
    for i in range(pieces):
        n = size + (1 if i < rest else 0)
        out.append(text[pos : pos + n])
        pos += n
    return out


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class FakeOpenAI:
    """What the upstream answers; change the fields between requests to steer it."""

    reply_text: str = "Hello from the fake upstream."
    deltas: int = 8
    event_delay: float = 0.0
    tool_arguments: dict = field(default_factory=lambda: {"city": "Paris"})
    received: list[ReceivedRequest] = field(default_factory=list)
    # A request whose body contains a marker gets that marker's reply text instead of reply_text.
    reply_overrides: dict[str, str] = field(default_factory=dict)
    # Content-encoding the upstream applies whatever the client asked: None, "gzip", or a bogus name.
    json_encoding: str | None = None
    stream_encoding: str | None = None
    # A citation the upstream attaches to its Responses text ({"title": ..., "url": ...}); None: none.
    citation: dict | None = None

    @staticmethod
    def logprobs_of(text: str) -> list[dict]:
        """Token logprobs that spell the text (3-character tokens), each with a top alternative: itself."""
        tokens = [text[i:i + 3] for i in range(0, len(text), 3)]
        entry = lambda t: {"token": t, "bytes": list(t.encode()), "logprob": -0.25}  # noqa: E731
        return [dict(entry(t), top_logprobs=[entry(t)]) for t in tokens]

    @staticmethod
    def _wants_logprobs(body: dict) -> bool:
        return "message.output_text.logprobs" in (body.get("include") or []) or bool(body.get("logprobs"))

    def _annotations(self, text: str) -> list[dict]:
        if not self.citation:
            return []
        return [{"type": "url_citation", "start_index": 0, "end_index": len(text), **self.citation}]

    def text_for(self, body: dict) -> str:
        raw = json.dumps(body)
        return next((text for marker, text in self.reply_overrides.items() if marker in raw), self.reply_text)

    # ---- Responses API -------------------------------------------------------------------------
    def _response_object(self, model: str, output: list, status: str = "completed") -> dict:
        return {
            "id": _id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": {
                "input_tokens": 12,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 7,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 19,
            },
        }

    @staticmethod
    def _function_tools(body: dict) -> list[str]:
        names = []
        for tool in body.get("tools") or []:
            if tool.get("type") == "function":
                names.append(tool.get("name") or (tool.get("function") or {}).get("name"))
        return [n for n in names if n]

    def _responses_tool_output(self, body: dict) -> str | None:
        items = body.get("input")
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict) and item.get("type") == "function_call_output":
                    return str(item.get("output"))
        return None

    def responses_plan(self, body: dict) -> tuple[str, Any]:
        """('call', (name, arguments)) for a tool call, else ('text', text)."""
        tools = self._function_tools(body)
        tool_output = self._responses_tool_output(body)
        if tools and tool_output is None:
            return "call", (tools[0], json.dumps(self.tool_arguments))
        if tool_output is not None:
            return "text", f"{self.text_for(body)} Tool said: {tool_output}"
        return "text", self.text_for(body)

    def responses_json(self, body: dict) -> dict:
        kind, what = self.responses_plan(body)
        model = body.get("model", "gpt-test")
        if kind == "call":
            name, arguments = what
            item = {"type": "function_call", "id": _id("fc"), "call_id": _id("call"), "name": name,
                    "arguments": arguments, "status": "completed"}
        else:
            part = {"type": "output_text", "text": what, "annotations": self._annotations(what)}
            if self._wants_logprobs(body):
                part["logprobs"] = self.logprobs_of(what)
            item = {"type": "message", "id": _id("msg"), "status": "completed", "role": "assistant",
                    "content": [part]}
        return self._response_object(model, [item])

    def responses_events(self, body: dict):
        kind, what = self.responses_plan(body)
        model = body.get("model", "gpt-test")
        seq = itertools.count()
        response = self._response_object(model, [], status="in_progress")
        yield "response.created", {"type": "response.created", "sequence_number": next(seq), "response": response}
        yield "response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq), "response": response}
        if kind == "call":
            name, arguments = what
            item = {"type": "function_call", "id": _id("fc"), "call_id": _id("call"), "name": name,
                    "arguments": "", "status": "in_progress"}
            yield "response.output_item.added", {"type": "response.output_item.added", "sequence_number": next(seq),
                                                 "output_index": 0, "item": dict(item)}
            for piece in split_text(arguments, self.deltas):
                yield "response.function_call_arguments.delta", {
                    "type": "response.function_call_arguments.delta", "sequence_number": next(seq),
                    "item_id": item["id"], "output_index": 0, "delta": piece}
            yield "response.function_call_arguments.done", {
                "type": "response.function_call_arguments.done", "sequence_number": next(seq),
                "item_id": item["id"], "output_index": 0, "name": name, "arguments": arguments}
            item.update(arguments=arguments, status="completed")
        else:
            item = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant", "content": []}
            yield "response.output_item.added", {"type": "response.output_item.added", "sequence_number": next(seq),
                                                 "output_index": 0, "item": dict(item)}
            part = {"type": "output_text", "text": "", "annotations": []}
            yield "response.content_part.added", {"type": "response.content_part.added", "sequence_number": next(seq),
                                                  "item_id": item["id"], "output_index": 0, "content_index": 0,
                                                  "part": part}
            logprobs = self._wants_logprobs(body)
            for piece in split_text(what, self.deltas):
                yield "response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": next(seq),
                                                     "item_id": item["id"], "output_index": 0, "content_index": 0,
                                                     "delta": piece, "logprobs": self.logprobs_of(piece) if logprobs else []}
            for i, annotation in enumerate(self._annotations(what)):
                yield "response.output_text.annotation.added", {
                    "type": "response.output_text.annotation.added", "sequence_number": next(seq),
                    "item_id": item["id"], "output_index": 0, "content_index": 0, "annotation_index": i,
                    "annotation": annotation}
            yield "response.output_text.done", {"type": "response.output_text.done", "sequence_number": next(seq),
                                                "item_id": item["id"], "output_index": 0, "content_index": 0,
                                                "text": what, "logprobs": self.logprobs_of(what) if logprobs else []}
            part = {"type": "output_text", "text": what, "annotations": self._annotations(what)}
            if logprobs:
                part["logprobs"] = self.logprobs_of(what)
            yield "response.content_part.done", {"type": "response.content_part.done", "sequence_number": next(seq),
                                                 "item_id": item["id"], "output_index": 0, "content_index": 0,
                                                 "part": part}
            item.update(status="completed", content=[part])
        yield "response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(seq),
                                            "output_index": 0, "item": item}
        done = dict(response, status="completed", output=[item])
        yield "response.completed", {"type": "response.completed", "sequence_number": next(seq), "response": done}

    # ---- Chat Completions ----------------------------------------------------------------------
    def chat_plan(self, body: dict) -> tuple[str, Any]:
        tools = self._function_tools(body)
        tool_output = next((m.get("content") for m in body.get("messages", []) if m.get("role") == "tool"), None)
        if tools and tool_output is None:
            return "call", (tools[0], json.dumps(self.tool_arguments))
        if tool_output is not None:
            return "text", f"{self.text_for(body)} Tool said: {tool_output}"
        return "text", self.text_for(body)

    def chat_json(self, body: dict) -> dict:
        kind, what = self.chat_plan(body)
        if kind == "call":
            name, arguments = what
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": _id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": what, "refusal": None}
            finish = "stop"
        logprobs = {"content": self.logprobs_of(what), "refusal": None} if body.get("logprobs") and kind == "text" else None
        return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "gpt-test"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}

    def chat_chunks(self, body: dict):
        kind, what = self.chat_plan(body)
        base = {"id": _id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model", "gpt-test")}

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}])

        yield chunk({"role": "assistant", "content": ""})
        if kind == "call":
            name, arguments = what
            yield chunk({"tool_calls": [{"index": 0, "id": _id("call"), "type": "function",
                                         "function": {"name": name, "arguments": ""}}]})
            for piece in split_text(arguments, self.deltas):
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            yield chunk({}, "tool_calls")
        else:
            for piece in split_text(what, self.deltas):
                piece_chunk = chunk({"content": piece})
                if body.get("logprobs"):
                    piece_chunk["choices"][0]["logprobs"] = {"content": self.logprobs_of(piece), "refusal": None}
                yield piece_chunk
            yield chunk({}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            yield dict(base, choices=[], usage={"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19})

    # ---- Embeddings ----------------------------------------------------------------------------
    @staticmethod
    def embeddings_json(body: dict) -> dict:
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, text in enumerate(inputs):
            vector = [round((len(str(text)) + k) / 10.0, 3) for k in range(4)]
            if body.get("encoding_format") == "base64":
                embedding: Any = base64.b64encode(struct.pack("<4f", *vector)).decode()
            else:
                embedding = vector
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return {"object": "list", "data": data, "model": body.get("model", "text-embedding-test"),
                "usage": {"prompt_tokens": 3, "total_tokens": 3}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes; with Nagle on, delayed ACKs add ~40 ms to every reply.
    disable_nagle_algorithm = True
    server: "FakeOpenAIServer"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        if self.server.fake.json_encoding:
            data = gzip.compress(data) if self.server.fake.json_encoding == "gzip" else data
            self.send_header("content-encoding", self.server.fake.json_encoding)
        self.send_header("content-length", str(len(data)))
        self.send_header("x-request-id", _id("req_upstream"))
        self.end_headers()
        self.wfile.write(data)

    def _send_sse(self, events) -> None:
        fake = self.server.fake
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        compressor = None
        if fake.stream_encoding:
            self.send_header("content-encoding", fake.stream_encoding)
            if fake.stream_encoding == "gzip":
                compressor = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
        self.end_headers()
        for i, (event, payload) in enumerate(events):
            if i and fake.event_delay:
                time.sleep(fake.event_delay)
            text = (f"event: {event}\n" if event else "") + f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
            data = text.encode()
            if compressor:  # flushed per event, so the compressed stream still streams
                data = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        if compressor:
            tail = compressor.flush()
            self.wfile.write(f"{len(tail):x}\r\n".encode() + tail + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        self._record(b"")
        if self.path.rstrip("/").endswith("/models"):
            self._send_json(200, {"object": "list", "data": [{"id": "gpt-test", "object": "model", "created": 0,
                                                              "owned_by": "fake"}]})
        else:
            self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error",
                                            "param": None, "code": "not_found"}})

    def do_POST(self) -> None:
        body_bytes = self.rfile.read(int(self.headers.get("content-length") or 0))
        self._record(body_bytes)
        body = json.loads(body_bytes or b"{}")
        fake = self.server.fake
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/responses"):
            if body.get("stream"):
                self._send_sse(fake.responses_events(body))
            else:
                self._send_json(200, fake.responses_json(body))
        elif path.endswith("/chat/completions"):
            if body.get("stream"):
                self._send_sse([*((None, c) for c in fake.chat_chunks(body)), (None, "[DONE]")])
            else:
                self._send_json(200, fake.chat_json(body))
        elif path.endswith("/embeddings"):
            self._send_json(200, fake.embeddings_json(body))
        elif path.endswith("/traces/ingest"):
            self._send_json(200, {"object": "trace_ingest", "accepted": len(body.get("data") or [])})
        else:
            self._send_json(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error",
                                            "param": None, "code": "not_found"}})

    def _record(self, body: bytes) -> None:
        self.server.fake.received.append(
            ReceivedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )


class FakeOpenAIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeOpenAI, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake
        self.ssl_context = ssl_context
        self._thread: threading.Thread | None = None

    def get_request(self):
        sock, addr = super().get_request()
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True)
        return sock, addr

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> "FakeOpenAIServer":
        self._thread = threading.Thread(target=self.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def pii_reply(total_bytes: int) -> str:
    """About total_bytes of prose holding three personal data values (for benchmarks)."""
    prose = "The quarterly report shows steady growth in all regions and the team expects more next year. "
    filler = (prose * (total_bytes // len(prose) + 2))
    third = max(0, total_bytes // 3 - 40)
    return (filler[:third] + " Reach me at jane.roe@example.org. " + filler[:third]
            + " My card is 4111 1111 1111 1111 and my phone +1 415-555-0100. " + filler[:third]).strip()


def main() -> None:
    """Serve the fake upstream on its own (for benchmarks): prints 'PORT <n>' once listening."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--reply-bytes", type=int, default=0, help="make the reply text about this long")
    parser.add_argument("--pii", action="store_true", help="put three personal data values in the reply")
    parser.add_argument("--deltas", type=int, default=8)
    parser.add_argument("--event-delay", type=float, default=0.0)
    args = parser.parse_args()
    fake = FakeOpenAI(deltas=args.deltas, event_delay=args.event_delay)
    if args.pii:
        fake.reply_text = pii_reply(args.reply_bytes or 1400)
    elif args.reply_bytes:
        words = "The quick brown fox jumps over the lazy dog. "
        fake.reply_text = (words * (args.reply_bytes // len(words) + 1))[: args.reply_bytes]
    server = FakeOpenAIServer(fake)
    print(f"PORT {server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
