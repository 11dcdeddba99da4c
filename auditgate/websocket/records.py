"""The digest over a WebSocket session's recorded messages, as the audit log's websocket_session entry names it.

``messages_sha256`` is the SHA-256 over every message of ``flow.websocket.messages`` as the flow file
holds it (masked, audio digested), in order. Each message contributes one header line and its bytes:

    b"%d %d %d %d %d\\n" % (from_client, opcode, dropped, injected, len(content)) + content + b"\\n"

Messages are taken as mitmproxy ``WebSocketMessage`` objects or as their state tuples
``(opcode, from_client, content, timestamp, dropped, injected)`` read back from a flow file, so the
offline verifier (``auditgate.audit``, no mitmproxy) can recompute it from ``websocket.messages``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any


def _fields(message: Any) -> tuple[int, bool, bytes, bool, bool]:
    if isinstance(message, (tuple, list)):
        opcode, from_client, content = message[0], message[1], message[2]
        dropped = message[4] if len(message) > 4 else False
        injected = message[5] if len(message) > 5 else False
    else:
        opcode, from_client, content = message.type, message.from_client, message.content
        dropped, injected = message.dropped, message.injected
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogateescape")
    return int(opcode), bool(from_client), bytes(content), bool(dropped), bool(injected)


def messages_sha256(messages: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for message in messages:
        opcode, from_client, content, dropped, injected = _fields(message)
        digest.update(b"%d %d %d %d %d\n" % (from_client, opcode, dropped, injected, len(content)))
        digest.update(content)
        digest.update(b"\n")
    return digest.hexdigest()
