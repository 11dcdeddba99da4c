"""A local WebSocket upstream for tests and benchmarks, speaking the two OpenAI WebSocket protocols well
enough for the real clients (the openai SDK's `responses.connect()` / `realtime.connect()`, the Agents
SDK's websocket Responses transport and its `agents.realtime` sessions):

- /v1/responses: the Responses API's WebSocket mode. Each `response.create` client event is answered with
  the usual Responses stream events (response.created ... response.output_text.delta xN ...
  response.completed), shaped like the HTTP stream's (tests/fake_openai.py) so the SDKs parse them.
- /v1/realtime: the Realtime API (GA shapes). session.created on connect; session.update →
  session.updated; conversation.item.create → conversation.item.created; input_audio_buffer.commit →
  input_audio_buffer.committed + conversation.item.input_audio_transcription.completed; response.create →
  response.created, the output item and part, text deltas (text modality) or audio + transcript deltas
  (audio modality), the .done events and response.done.

The reply text is configurable, down to the exact deltas (`pieces`), so a value can be split across
deltas at chosen points. Every upgrade's headers and every client message are recorded (to check the
gateway's key arrived and the caller's token did not, and that a blocked event never got here), and
`echo_authorization` makes the upstream say the Authorization header it got inside a delta (to check the
gateway scrubs its own key from what comes back).

Served by the `websockets` library's threaded server on 127.0.0.1, port 0, plain or TLS.
Run alone (for benchmarks): `python -m tests.fake_websocket_upstream [--pii] ...` prints 'PORT <n>'.
"""

from __future__ import annotations

import base64
import itertools
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from tests.fake_openai import FakeOpenAI, pii_reply, split_text

_ids = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}_ws{next(_ids):06d}"


@dataclass
class Upgrade:
    """One WebSocket upgrade request as it reached the upstream."""

    path: str
    headers: dict[str, str]  # lower-cased names


@dataclass
class ReceivedMessage:
    """One message a client (through whatever proxy) sent to the upstream."""

    path: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def type(self) -> str | None:
        try:
            return self.json().get("type")
        except (ValueError, AttributeError):
            return None


DEFAULT_REPLY = "Hello from the fake WebSocket upstream."
# 100 ms of 24 kHz 16-bit mono silence: what one Realtime audio delta roughly carries.
AUDIO_CHUNK = base64.b64encode(bytes(4800)).decode()


@dataclass
class FakeWebSocketUpstream:
    """What the upstream answers; change the fields between sessions to steer it."""

    reply_text: str = DEFAULT_REPLY
    # The exact text deltas of a reply (their concatenation is the reply); None: reply_text in `deltas` pieces.
    pieces: list[str] | None = None
    deltas: int = 8
    event_delay: float = 0.0  # seconds between a reply's events
    # Append " Upstream saw: <Authorization header of the upgrade>" as a delta of its own.
    echo_authorization: bool = False
    # A client event whose JSON contains a marker gets that marker's reply text.
    reply_overrides: dict[str, str] = field(default_factory=dict)
    # What the Realtime API "heard" when the client commits its input audio buffer.
    input_transcript: str = "This is what the caller said."
    upgrades: list[Upgrade] = field(default_factory=list)
    received: list[ReceivedMessage] = field(default_factory=list)

    def reset(self) -> "FakeWebSocketUpstream":
        fresh = FakeWebSocketUpstream()
        for name in ("reply_text", "pieces", "deltas", "event_delay", "echo_authorization", "reply_overrides",
                     "input_transcript"):
            setattr(self, name, getattr(fresh, name))
        self.upgrades.clear()
        self.received.clear()
        return self

    def messages(self, type_: str | None = None) -> list[ReceivedMessage]:
        return [m for m in self.received if type_ is None or m.type == type_]

    def text_pieces(self, raw_event: str, authorization: str) -> list[str]:
        if self.pieces is not None:
            pieces = list(self.pieces)
        else:
            text = next((t for marker, t in self.reply_overrides.items() if marker in raw_event), self.reply_text)
            pieces = split_text(text, self.deltas)
        if self.echo_authorization:
            pieces.append(f" Upstream saw: {authorization}")
        return pieces

    def _pause(self) -> None:
        if self.event_delay:
            time.sleep(self.event_delay)

    # ---- serving ---------------------------------------------------------------------------------
    def handle(self, websocket: ServerConnection) -> None:
        path = urlsplit(websocket.request.path).path
        headers = {k.lower(): v for k, v in websocket.request.headers.raw_items()}
        self.upgrades.append(Upgrade(websocket.request.path, headers))
        authorization = headers.get("authorization", "")
        if path.endswith("/responses"):
            session: _Session = _ResponsesSession(self, websocket, authorization)
        elif path.endswith("/realtime"):
            session = _RealtimeSession(self, websocket, authorization)
        else:
            websocket.close(1008, "unknown path")
            return
        try:
            session.opened()
            for data in websocket:
                text = data.decode() if isinstance(data, bytes) else data
                self.received.append(ReceivedMessage(websocket.request.path, text))
                session.on_message(text)
        except ConnectionClosed:
            pass


class _Session:
    def __init__(self, fake: FakeWebSocketUpstream, websocket: ServerConnection, authorization: str) -> None:
        self.fake, self.websocket, self.authorization = fake, websocket, authorization
        self.query = parse_qs(urlsplit(websocket.request.path).query)

    def send(self, event: dict) -> None:
        self.websocket.send(json.dumps(event))

    def opened(self) -> None:
        pass

    def on_message(self, text: str) -> None:
        raise NotImplementedError

    def error(self, message: str, code: str | None = None) -> None:
        self.send({"type": "error", "event_id": _id("event"),
                   "error": {"type": "invalid_request_error", "code": code, "message": message, "param": None}})


class _ResponsesSession(_Session):
    """The Responses API's WebSocket mode: one `response.create` → one streamed response."""

    def on_message(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            return self.error("Invalid JSON.", "invalid_json")
        if event.get("type") != "response.create":
            return self.error(f"Unsupported event type {event.get('type')!r}.", "unsupported_event")
        body = {k: v for k, v in event.items() if k not in ("type", "event_id")}
        for payload in self.response_events(body, text):
            self.send(payload)
            self.fake._pause()

    def response_events(self, body: dict, raw: str):
        pieces = self.fake.text_pieces(raw, self.authorization)
        text = "".join(pieces)
        seq = itertools.count()
        response = FakeOpenAI()._response_object(body.get("model", "gpt-test"), [], status="in_progress")
        response["id"] = _id("resp")
        response["previous_response_id"] = body.get("previous_response_id")
        response["instructions"] = body.get("instructions")
        yield {"type": "response.created", "sequence_number": next(seq), "response": response}
        yield {"type": "response.in_progress", "sequence_number": next(seq), "response": response}
        item = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant", "content": []}
        yield {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
               "item": dict(item)}
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        yield {"type": "response.content_part.added", "sequence_number": next(seq), **where,
               "part": {"type": "output_text", "text": "", "annotations": []}}
        for piece in pieces:
            yield {"type": "response.output_text.delta", "sequence_number": next(seq), **where, "delta": piece,
                   "logprobs": []}
        yield {"type": "response.output_text.done", "sequence_number": next(seq), **where, "text": text,
               "logprobs": []}
        part = {"type": "output_text", "text": text, "annotations": []}
        yield {"type": "response.content_part.done", "sequence_number": next(seq), **where, "part": part}
        item.update(status="completed", content=[part])
        yield {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0, "item": item}
        yield {"type": "response.completed", "sequence_number": next(seq),
               "response": dict(response, status="completed", output=[item])}


class _RealtimeSession(_Session):
    """The Realtime API (GA event shapes), text or audio output."""

    def opened(self) -> None:
        model = (self.query.get("model") or ["gpt-realtime"])[0]
        self.session = {"type": "realtime", "object": "realtime.session", "id": _id("sess"), "model": model,
                        "output_modalities": ["audio"], "instructions": "", "tools": [], "tool_choice": "auto",
                        "max_output_tokens": "inf"}
        self.last_item_id: str | None = None
        self.send({"type": "session.created", "event_id": _id("event"), "session": self.session})

    def on_message(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            return self.error("Invalid JSON.", "invalid_json")
        kind = event.get("type")
        if kind == "session.update":
            update = {k: v for k, v in (event.get("session") or {}).items() if v is not None}
            self.session.update(update, type="realtime")
            self.send({"type": "session.updated", "event_id": _id("event"), "session": self.session})
        elif kind == "conversation.item.create":
            item = dict(event.get("item") or {})
            item.setdefault("id", _id("item"))
            item.setdefault("object", "realtime.item")
            item.setdefault("status", "completed")
            self.send({"type": "conversation.item.created", "event_id": _id("event"),
                       "previous_item_id": self.last_item_id, "item": item})
            self.last_item_id = item["id"]
        elif kind == "input_audio_buffer.commit":
            item_id = _id("item")
            self.send({"type": "input_audio_buffer.committed", "event_id": _id("event"),
                       "previous_item_id": self.last_item_id, "item_id": item_id})
            self.last_item_id = item_id
            self.send({"type": "conversation.item.input_audio_transcription.completed", "event_id": _id("event"),
                       "item_id": item_id, "content_index": 0, "transcript": self.fake.input_transcript,
                       "usage": {"type": "duration", "seconds": 1.0}})
        elif kind == "response.create":
            for payload in self.response_events(event.get("response") or {}, text):
                self.send(payload)
                self.fake._pause()
        elif kind in ("input_audio_buffer.append", "input_audio_buffer.clear", "output_audio_buffer.clear",
                      "response.cancel", "conversation.item.truncate", "conversation.item.delete"):
            pass  # accepted silently, as far as these tests care
        else:
            self.error(f"Unsupported event type {kind!r}.", "unsupported_event")

    def response_events(self, options: dict, raw: str):
        modalities = options.get("output_modalities") or self.session.get("output_modalities") or ["audio"]
        audio = "audio" in modalities
        pieces = self.fake.text_pieces(raw, self.authorization)
        text = "".join(pieces)
        response_id, item_id = _id("resp"), _id("item")
        response = {"object": "realtime.response", "id": response_id, "status": "in_progress",
                    "status_details": None, "output": [], "conversation_id": "conv_fake",
                    "output_modalities": ["audio" if audio else "text"], "max_output_tokens": "inf",
                    "metadata": None, "usage": None}
        base = {"response_id": response_id}
        yield {"type": "response.created", "event_id": _id("event"), "response": response}
        item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}
        yield {"type": "response.output_item.added", "event_id": _id("event"), **base, "output_index": 0,
               "item": dict(item)}
        where = {**base, "item_id": item_id, "output_index": 0, "content_index": 0}
        yield {"type": "response.content_part.added", "event_id": _id("event"), **where,
               "part": {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}}
        if audio:
            yield {"type": "response.output_audio.delta", "event_id": _id("event"), **where, "delta": AUDIO_CHUNK}
            for piece in pieces:
                yield {"type": "response.output_audio_transcript.delta", "event_id": _id("event"), **where,
                       "delta": piece}
            yield {"type": "response.output_audio.done", "event_id": _id("event"), **where}
            yield {"type": "response.output_audio_transcript.done", "event_id": _id("event"), **where,
                   "transcript": text}
            part, content = {"type": "audio", "transcript": text}, {"type": "output_audio", "transcript": text}
        else:
            for piece in pieces:
                yield {"type": "response.output_text.delta", "event_id": _id("event"), **where, "delta": piece}
            yield {"type": "response.output_text.done", "event_id": _id("event"), **where, "text": text}
            part, content = {"type": "text", "text": text}, {"type": "output_text", "text": text}
        yield {"type": "response.content_part.done", "event_id": _id("event"), **where, "part": part}
        item.update(status="completed", content=[content])
        yield {"type": "response.output_item.done", "event_id": _id("event"), **base, "output_index": 0,
               "item": item}
        self.last_item_id = item_id
        usage = {"total_tokens": 19, "input_tokens": 12, "output_tokens": 7,
                 "input_token_details": {"text_tokens": 12, "audio_tokens": 0, "cached_tokens": 0},
                 "output_token_details": {"text_tokens": 7, "audio_tokens": 0}}
        yield {"type": "response.done", "event_id": _id("event"),
               "response": dict(response, status="completed", output=[item], usage=usage)}


class FakeWebSocketServer:
    """Serves a FakeWebSocketUpstream on 127.0.0.1 (port 0) in a background thread."""

    def __init__(self, fake: FakeWebSocketUpstream | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.fake = fake or FakeWebSocketUpstream()
        self.server: Server = serve(self.fake.handle, "127.0.0.1", 0, ssl=ssl_context, compression=None,
                                    max_size=None)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-websocket-upstream", daemon=True)

    @property
    def port(self) -> int:
        return self.server.socket.getsockname()[1]

    def start(self) -> "FakeWebSocketServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


def main() -> None:
    """Serve the fake on its own (for benchmarks): prints 'PORT <n>' once listening."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--reply-bytes", type=int, default=0, help="make the reply text about this long")
    parser.add_argument("--pii", action="store_true", help="put three personal data values in the reply")
    parser.add_argument("--deltas", type=int, default=8)
    parser.add_argument("--event-delay", type=float, default=0.0)
    args = parser.parse_args()
    fake = FakeWebSocketUpstream(deltas=args.deltas, event_delay=args.event_delay)
    if args.pii:
        fake.reply_text = pii_reply(args.reply_bytes or 1400)
    elif args.reply_bytes:
        words = "The quick brown fox jumps over the lazy dog. "
        fake.reply_text = (words * (args.reply_bytes // len(words) + 1))[: args.reply_bytes]
    server = FakeWebSocketServer(fake)
    print(f"PORT {server.port}", flush=True)
    try:
        server.server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
