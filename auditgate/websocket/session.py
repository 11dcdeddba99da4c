"""A WebSocket session's governance record on the flow (``flow_contract.WEBSOCKET``): which concern
governed which message, and which messages are the gateway's own. Plain logic over ``flow.metadata``.

Each concern marks the message it governed (``mark``) by the message count at that moment; the last
addon of the bundle (websocket_gate) lets a message go only if every concern it needs marked it. The
gateway's own messages (an error event to the client, a held client event released after approval)
pass the hooks again when injected: they are known by the SHA-256 of their content, noted before they
are sent (``note_own``) and recognised once, by the first hook that meets them (``own_kind``).
"""

from __future__ import annotations

import hashlib

from auditgate.core.flow_contract import WEBSOCKET, WebSocketRecord

CLIENT_CONCERNS = ("policy", "masking")
SERVER_CONCERNS = ("masking", "key_custody")
MAX_OWN = 1024  # own messages waiting to be seen again (a session cannot make the gateway hoard digests)


def record(flow) -> WebSocketRecord:
    current = WEBSOCKET.get(flow)
    if current is None:
        current = {"governed": {}, "own": {}, "blocked": 0, "held": 0, "released": 0, "masked": 0, "findings": {},
                   "key_echoes": 0, "responses": 0}
        WEBSOCKET.set(flow, current)
    return current


def count(flow) -> int:
    return len(flow.websocket.messages) if flow.websocket is not None else 0


def mark(flow, concern: str) -> None:
    """``concern`` governed the latest message."""
    record(flow)["governed"][concern] = count(flow)


def governed(flow, concern: str) -> bool:
    return record(flow)["governed"].get(concern) == count(flow)


def missing(flow, from_client: bool) -> list[str]:
    """The concerns that did not govern the latest message."""
    return [c for c in (CLIENT_CONCERNS if from_client else SERVER_CONCERNS) if not governed(flow, c)]


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def note_own(flow, content: bytes, kind: str) -> None:
    """The gateway is about to inject ``content`` (kind: "error" to the client, "release" to the upstream)."""
    own = record(flow)["own"]
    if len(own) >= MAX_OWN:
        own.pop(next(iter(own)))
    own[digest(content)] = kind


def own_kind(flow) -> str | None:
    """"error" or "release" when the latest message is one the gateway injected itself, else None."""
    rec = record(flow)
    n = count(flow)
    current = rec.get("current_own")
    if current is not None and current[0] == n:
        return current[1]
    message = flow.websocket.messages[-1]
    kind = rec["own"].pop(digest(message.content), None) if message.injected else None
    rec["current_own"] = [n, kind]
    return kind


def add_findings(flow, findings) -> None:
    total = record(flow)["findings"]
    for entity, n in findings.items():
        total[entity] = total.get(entity, 0) + n
