"""Audio payloads as the records keep them: by default their size and SHA-256 only, never the sound.

Audio travels base64-encoded in JSON events (``input_audio_buffer.append``'s ``audio``,
``response.output_audio.delta``'s ``delta``, an ``input_audio`` content part's ``audio``). It is
forwarded unchanged; the recorded copy of the message holds, in its place,
``{"omitted": "audio", "base64_chars": N, "sha256": HEX}`` (the digest of the base64 text as it was
sent), unless the operator keeps audio (``gateway_websocket_audio=keep``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from auditgate.websocket.events import AUDIO_FIELDS, AUDIO_KEYS, dump

MODES = ("digest", "keep")


def audio_digest(base64_text: str) -> dict:
    return {"omitted": "audio", "base64_chars": len(base64_text),
            "sha256": hashlib.sha256(base64_text.encode("ascii", "replace")).hexdigest()}


def _digest_audio_keys(value: Any) -> tuple[Any, int]:
    if isinstance(value, dict):
        out, count = {}, 0
        for key, item in value.items():
            if key in AUDIO_KEYS and isinstance(item, str) and item:
                out[key], count = audio_digest(item), count + 1
            else:
                out[key], n = _digest_audio_keys(item)
                count += n
        return out, count
    if isinstance(value, list):
        out_list, count = [], 0
        for item in value:
            masked, n = _digest_audio_keys(item)
            out_list.append(masked)
            count += n
        return out_list, count
    return value, 0


def recorded_form(content: bytes) -> bytes | None:
    """The message as recorded with its audio digested; None when it carries no audio (recorded as is)."""
    if b'"audio"' not in content and b'audio.delta"' not in content:
        return None  # cheap: most messages are text events
    try:
        event = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict):
        return None
    field = AUDIO_FIELDS.get(event.get("type"))
    count = 0
    if field is not None and isinstance(event.get(field), str) and event[field]:
        event = dict(event, **{field: audio_digest(event[field])})
        count += 1
    event, n = _digest_audio_keys(event)
    return dump(event) if count + n else None
