"""A WebSocket session's governance record on the flow (``flow_contract.WEBSOCKET``): which concern
governed which message, which messages are the gateway's own, and what the latest message stands for.
Plain logic over ``flow.metadata``.

Each concern marks the message it governed (``mark``) by the message count at that moment; the last
addon of the bundle (websocket_gate) lets a message go only if every concern it needs marked it. The
gateway's own messages (an error event to the client, a held client event released after approval,
server events it sends again) pass the hooks again when injected: they are known by the SHA-256 of
their content, noted before they are sent (``note_own``) and recognised once, by the first hook that
meets them (``own_kind``).

A server event may stand for more or fewer events than one (``expand``): masking holds back the tail
of a text stream and puts it, as one more delta, before the event that ends the stream; a delta whose
text is all held back stands for none. Each concern governs the events the message stands for
(``latest_events``, ``set_events``); websocket_gate then drops the message and sends those events
itself ("resent"), in order. Injected messages reach the client in the order they were injected, but
upstream messages that arrive meanwhile would overtake them: while any resent event is still on its
way (``in_flight``), websocket_gate sends every upstream event after it the same way, so the client
gets the events in the upstream's order.
"""

from __future__ import annotations

import hashlib

from auditgate.core.flow_contract import WEBSOCKET, WebSocketRecord

CLIENT_CONCERNS = ("policy", "masking")
SERVER_CONCERNS = ("masking", "key_custody")
MAX_OWN = 1024  # own messages waiting to be seen again (a session cannot make the gateway hoard digests)
RESENT = "resent"  # a server event the gateway sends itself, governed already: the hooks pass it as it is


class TooManyInFlight(RuntimeError):
    """More of the gateway's own messages on their way than it keeps track of: the session is closed."""


def record(flow) -> WebSocketRecord:
    current = WEBSOCKET.get(flow)
    if current is None:
        current = {"governed": {}, "own": {}, "blocked": 0, "held": 0, "released": 0, "masked": 0, "findings": {},
                   "key_echoes": 0, "responses": 0, "in_flight": 0}
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
    """The gateway is about to inject ``content`` (kind: "error" to the client, "release" to the upstream,
    "resent" to the client). Raises TooManyInFlight rather than forget a resent event it must recognise."""
    rec = record(flow)
    own = rec["own"]
    key = digest(content)
    if key not in own and len(own) >= MAX_OWN:
        if kind == RESENT:
            raise TooManyInFlight(f"more than {MAX_OWN} of the gateway's own messages on their way")
        oldest = next((k for k, v in own.items() if _kind(v) != RESENT), None)
        if oldest is None:
            raise TooManyInFlight(f"more than {MAX_OWN} of the gateway's own messages on their way")
        own.pop(oldest)
    current = own.get(key)
    own[key] = [kind, (current[1] if isinstance(current, list) else 1 if current else 0) + 1]
    if kind == RESENT:
        rec["in_flight"] = rec.get("in_flight", 0) + 1


def _kind(value) -> str:
    return value[0] if isinstance(value, list) else value


def own_kind(flow) -> str | None:
    """"error", "release" or "resent" when the latest message is one the gateway injected itself, else None."""
    rec = record(flow)
    n = count(flow)
    current = rec.get("current_own")
    if current is not None and current[0] == n:
        return current[1]
    message = flow.websocket.messages[-1]
    kind = None
    if message.injected:
        key = digest(message.content)
        noted = rec["own"].get(key)
        if noted is not None:
            kind = _kind(noted)
            left = (noted[1] if isinstance(noted, list) else 1) - 1
            if left > 0:
                rec["own"][key] = [kind, left]
            else:
                rec["own"].pop(key)
            if kind == RESENT:
                rec["in_flight"] = max(0, rec.get("in_flight", 0) - 1)
    rec["current_own"] = [n, kind]
    return kind


def add_findings(flow, findings) -> None:
    total = record(flow)["findings"]
    for entity, n in findings.items():
        total[entity] = total.get(entity, 0) + n


# ---- what the latest message stands for ---------------------------------------------------------------------
def latest_events(flow) -> list[bytes]:
    """The events the latest message stands for: itself, unless a concern expanded it."""
    expanded = expansion(flow)
    return list(expanded) if expanded is not None else [flow.websocket.messages[-1].content]


def expansion(flow) -> list[bytes] | None:
    """The events a concern expanded the latest message into (maybe none), or None when it stands for itself."""
    current = record(flow).get("expand")
    return current[1] if current is not None and current[0] == count(flow) else None


def set_events(flow, contents: list[bytes]) -> None:
    """The latest message stands for ``contents`` now: one event is written into it, any other number
    is sent by websocket_gate in its place. (Masked content only: the events are the governed ones.)"""
    message = flow.websocket.messages[-1]
    if len(contents) == 1 and expansion(flow) is None:
        message.content = contents[0]
        return
    record(flow)["expand"] = [count(flow), list(contents)]
    message.content = contents[-1] if contents else b""


def take_expansion(flow) -> list[bytes] | None:
    """The latest message's expansion, taken off the record (content stays out of the recorded metadata)."""
    found = expansion(flow)
    record(flow).pop("expand", None)
    return found
