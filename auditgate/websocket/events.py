"""WebSocket messages as API events: which endpoint, which client events carry prompts, the error event.

The Responses API's WebSocket mode (``/v1/responses``) and the Realtime API (``/v1/realtime``) both
speak JSON text messages, one event each, with a ``type``. A client event is governed by policy when
it carries text: a prompt, instructions, tools, an item (``response.create``,
``conversation.item.create``, ``session.update``, ``response.steer``...), or any other text leaf at
all: an unknown event type with text is decided like a known one, never passed unexamined.
"""

from __future__ import annotations

import json
from typing import Any

from auditgate.core.strict_json import loads_strict

# The paths a WebSocket upgrade may go to (after any base path): everything else stays refused.
ENDPOINTS = {"responses": "responses", "realtime": "realtime"}

# Client events known to carry prompts, instructions or tools (others are decided too if they carry text).
PROMPT_EVENTS = frozenset({
    "response.create", "conversation.item.create", "session.update", "response.steer",
    "transcription_session.update",
})
# Server events that end one model response: the unit of the websocket_response audit entry.
RESPONSE_END_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete", "response.done",
                                 "response.cancelled"})
# Where audio travels as base64: (event type, field). Not text: forwarded as is, recorded per option.
AUDIO_FIELDS = {"input_audio_buffer.append": "audio", "response.output_audio.delta": "delta",
                "response.audio.delta": "delta"}
AUDIO_KEYS = frozenset({"audio"})  # an input_audio content part's payload, anywhere in an item


class NotAnEvent(ValueError):
    """A message that is not one JSON object with a string "type": the gateway cannot read it."""


def endpoint_of(path: str) -> str | None:
    """"responses" or "realtime" for a governed WebSocket path (query ignored), None for any other."""
    path = path.split("?", 1)[0].rstrip("/")
    last = path.rpartition("/")[2]
    return ENDPOINTS.get(last) if path.count("/") >= 1 else None


def parse(content: bytes, is_text: bool = True, *, strict: bool = False) -> dict:
    """The event a message holds; NotAnEvent when it holds none (binary, not JSON, no type).

    strict (client events, before policy): duplicate keys are refused, since policy would read one value
    and the upstream, with a first-wins parser, another. Server events are read leniently: every reader of
    them (masking, key custody) re-reads all members itself."""
    if not is_text:
        raise NotAnEvent("a binary message")
    try:
        event = loads_strict(content) if strict else json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise NotAnEvent("a message that is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise NotAnEvent("a JSON message without a \"type\"")
    return event


def dump(event: dict) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def without_audio(value: Any) -> Any:
    """The event without its base64 audio payloads (they carry no text to match or mask)."""
    if isinstance(value, dict):
        return {k: (None if k in AUDIO_KEYS and isinstance(v, str) else without_audio(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [without_audio(v) for v in value]
    return value


def prompt_payload(event: dict) -> dict:
    """The client event as a request payload for the prompt walker: every text it carries, audio left out.

    ``response.create`` carries its fields at the top (the Responses API's WebSocket mode) or under
    ``response`` (Realtime); ``session.update`` under ``session``; ``conversation.item.create`` an
    ``item``. The whole event is walked (structural keys pass), so nothing it carries goes unread.
    """
    payload = {k: v for k, v in event.items() if k not in ("type", "event_id")}
    return without_audio(payload)


def model_of(event: dict) -> str | None:
    for where in (event, event.get("response"), event.get("session")):
        if isinstance(where, dict) and isinstance(where.get("model"), str) and where["model"]:
            return where["model"][:256]
    return None


def error_event(code: str, message: str, error_type: str = "invalid_request_error") -> bytes:
    """The API's own error event (both APIs' SDKs raise or report it), from the gateway."""
    return dump({"type": "error", "error": {"type": error_type, "code": code, "message": message, "param": None}})


def response_id_of(event: dict) -> str | None:
    response = event.get("response")
    if isinstance(response, dict) and isinstance(response.get("id"), str):
        return response["id"]
    value = event.get("response_id")
    return value if isinstance(value, str) else None


def response_status_of(event: dict) -> str:
    response = event.get("response")
    if isinstance(response, dict) and isinstance(response.get("status"), str):
        return response["status"]
    return event["type"].rpartition(".")[2]
