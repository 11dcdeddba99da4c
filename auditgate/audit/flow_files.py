"""Reads mitmproxy flow files without mitmproxy: the tnetstring records and the body digests the audit log names.

A flow file (mitmproxy.io.FlowWriter) is a sequence of tnetstrings, one per flow: `<length>:<payload><type>`,
length in ASCII decimal, type one of `,` bytes, `;` UTF-8 text, `#` integer, `^` float, `!` boolean
(`true`/`false`), `~` null (empty payload), `]` list (concatenated tnetstrings), `}` dict (alternating key
and value tnetstrings). Each flow is a dict with `id`, `request` and `response` dicts whose `content` is
the body exactly as recorded (bytes, or null).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from auditgate.audit.record_digest import claims_of_state, record_digest
from auditgate.core.flow_contract import INTENT_SEQ, REFUSAL

FLOWS_SUBDIR = "flows"
_MAX_LENGTH_DIGITS = 12
MAX_DEPTH = 64  # mitmproxy's flow states nest about six levels, the gateway's metadata a few more


class TnetstringError(ValueError):
    pass


class TooDeep:
    """A list or dict nested deeper than MAX_DEPTH, skipped unread (its length says where it ends)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __repr__(self) -> str:
        return f"TooDeep(at byte {self.offset})"


def _parse_one(data: bytes | memoryview, pos: int, depth: int = 0, deep: list | None = None) -> tuple[object, int]:
    """The value starting at pos, and the position after it.

    Containers nested deeper than MAX_DEPTH are not descended into (a crafted record cannot exhaust the
    stack): they become TooDeep, and their offset is added to `deep`."""
    colon = pos
    end_of_digits = min(len(data), pos + _MAX_LENGTH_DIGITS + 1)
    while colon < end_of_digits and 0x30 <= data[colon] <= 0x39:
        colon += 1
    if colon == pos or colon >= len(data) or data[colon] != 0x3A:
        raise TnetstringError(f"no length prefix at byte {pos}")
    length = int(bytes(data[pos:colon]))
    start, stop = colon + 1, colon + 1 + length
    if stop >= len(data):
        raise TnetstringError(f"a value at byte {pos} runs past the end of the data")
    payload, kind = data[start:stop], data[stop]
    if kind == 0x2C:  # ,
        value = bytes(payload)
    elif kind == 0x3B:  # ;
        value = bytes(payload).decode("utf-8")
    elif kind == 0x23:  # #
        value = int(bytes(payload))
    elif kind == 0x5E:  # ^
        value = float(bytes(payload))
    elif kind == 0x21:  # !
        if bytes(payload) not in (b"true", b"false"):
            raise TnetstringError(f"bad boolean at byte {pos}")
        value = bytes(payload) == b"true"
    elif kind == 0x7E:  # ~
        if length:
            raise TnetstringError(f"null with a payload at byte {pos}")
        value = None
    elif kind in (0x5D, 0x7D) and depth >= MAX_DEPTH:
        value = TooDeep(pos)
        if deep is not None:
            deep.append(pos)
    elif kind == 0x5D:  # ]
        value, inner = [], start
        while inner < stop:
            item, inner = _parse_one(data[:stop], inner, depth + 1, deep)
            value.append(item)
    elif kind == 0x7D:  # }
        value, inner = {}, start
        while inner < stop:
            key, inner = _parse_one(data[:stop], inner, depth + 1, deep)
            if inner >= stop:
                raise TnetstringError(f"a dict key without a value at byte {inner}")
            if not isinstance(key, (bytes, str)):
                raise TnetstringError(f"a dict key that is not a string at byte {inner}")
            item, inner = _parse_one(data[:stop], inner, depth + 1, deep)
            value[key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key] = item
    else:
        raise TnetstringError(f"unknown type {chr(kind)!r} at byte {stop}")
    return value, stop + 1


def parse_tnetstring(data: bytes) -> object:
    value, end = _parse_one(memoryview(data), 0, 0, [])
    if end != len(data):
        raise TnetstringError(f"{len(data) - end} bytes after the value")
    return value


def iter_records(data: bytes, deep: list | None = None):
    """Yield (offset, value) for each record; a record cut short at the end raises TnetstringError with
    `.offset` set, so a crash-cut file can be told from a damaged one. Offsets of parts nested too deep
    to read are added to `deep`."""
    view, pos = memoryview(data), 0
    while pos < len(data):
        try:
            value, end = _parse_one(view, pos, 0, deep)
        except (TnetstringError, ValueError) as e:
            error = TnetstringError(f"unreadable flow record at byte {pos}: {e}")
            error.offset = pos
            raise error from None
        yield pos, value
        pos = end


def _body_digest(message: object) -> str | None:
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    return hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else None


@dataclass
class FlowRecord:
    file: str
    offset: int
    flow_id: str
    request_sha256: str | None
    response_sha256: str | None
    refusal_code: str | None
    record: dict | None = None  # the whole-flow digest of what the record holds (auditgate.audit.record_digest)
    intent: int | None = None  # the seq of the flow's intent entry, as its metadata names it


@dataclass
class FlowFile:
    name: str
    records: list[FlowRecord] = field(default_factory=list)
    cut_at: int | None = None  # byte offset of an unreadable (partial) last record
    error: str | None = None
    too_deep: list[int] = field(default_factory=list)  # offsets of parts nested deeper than MAX_DEPTH, not read


def read_flow_file(path: Path) -> FlowFile:
    result = FlowFile(path.name)
    if not path.is_file():  # a device or a FIFO under a flow file's name would be read forever
        result.error = "not a regular file"
        return result
    data = path.read_bytes()
    try:
        for offset, value in iter_records(data, result.too_deep):
            if not isinstance(value, dict):
                continue
            metadata = value.get("metadata") if isinstance(value.get("metadata"), dict) else {}
            refusal = REFUSAL.read(metadata) if isinstance(REFUSAL.read(metadata), dict) else {}
            refusal = refusal if isinstance(refusal.get("code"), (str, type(None))) else {}
            intent = INTENT_SEQ.read(metadata)
            result.records.append(FlowRecord(
                file=path.name, offset=offset, flow_id=str(value.get("id")),
                request_sha256=_body_digest(value.get("request")), response_sha256=_body_digest(value.get("response")),
                refusal_code=refusal.get("code"), record=record_digest(claims_of_state(value)),
                intent=intent if isinstance(intent, int) and not isinstance(intent, bool) else None,
            ))
    except TnetstringError as e:
        result.cut_at, result.error = getattr(e, "offset", None), str(e)
    return result


def read_flow_files(records_dir: Path) -> dict[str, FlowFile]:
    directory = records_dir / FLOWS_SUBDIR
    if not directory.is_dir():
        return {}
    return {p.name: read_flow_file(p) for p in sorted(directory.glob("*.mitm"))}
