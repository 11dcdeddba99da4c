"""The whole-flow digest: what a flow record claims, field by field, as a flow's record entry commits to it.

One function of the flow as the gateway holds it (`claims_of_flow`, in the audit log addon as the flow
recorder takes the record) and one of the flow record as mitmproxy wrote it (`claims_of_state`, in the
verifier, from the tnetstring state without mitmproxy) give the same claims for the same flow;
`tests/test_evidence_record_digest.py` checks that on flows of every shape written and read back. No mitmproxy import.

A claim is a named field (`request.path`, `response.status_code`, `metadata.auditgate.identity`...) and its
value made JSON: bytes as ISO-8859-1 text (one character per byte), timestamps as integer microseconds,
other floats as their shortest repr text, bodies and WebSocket message contents as their SHA-256. Each
field's digest is the SHA-256 of its value's RFC 8785 canonical JSON; the record digest is the SHA-256 of
the RFC 8785 canonical JSON of {field: digest}. A field whose value is null is left out.

The record entry (format 3; format 2's flow entry) carries {"sha256": the record digest, "fields": {field:
first 16 hex digits of its digest}}: the record digest decides; the short digests only say which field differs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping

from auditgate.audit.chain import (
    JSON_SAFE_INT,
    CanonicalJsonError,
    encode_sorted,
    jcs,
    sha256_hex,
    sorted_json,
)

METADATA_PREFIX = "auditgate."
SHORT_DIGEST = 16  # hex digits per field in the entry: enough to name the field; the full digest decides
ERROR_FIELD = "error"  # set by mitmproxy after the response hook when the client left meanwhile (see verify)


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return str(value)


def _micros(value) -> int | None:
    return None if value is None else round(float(value) * 1_000_000)


def _sha(content) -> str | None:
    if content is None:
        return None
    return hashlib.sha256(bytes(content) if not isinstance(content, bytes) else content).hexdigest()


def _headers(fields: Iterable | None) -> list | None:
    if fields is None:
        return None
    return [[_text(name), _text(value)] for name, value in fields]


def _flow_headers(fields: Iterable | None) -> list | None:
    """_headers() of a live flow's Headers.fields (pairs of bytes), without a call per name and value."""
    if fields is None:
        return None
    try:
        return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in fields]
    except (AttributeError, TypeError, ValueError):  # not pairs of bytes: the general way decides
        return _headers(fields)


def _plain(value, depth: int = 0):
    """Metadata made JSON the same way from the live flow and from the tnetstring record."""
    if depth > 32:
        return "<nested too deep>"
    kind = type(value)
    if kind is str or value is None or kind is bool:  # the common cases first: this runs for every entry
        return value
    if kind is dict:
        if depth >= 32:  # its values would be "<nested too deep>": the general way
            return {str(k): _plain(v, depth + 1) for k, v in value.items()}
        # Text, null and booleans, which _plain() returns unchanged, taken without a call.
        return {k if type(k) is str else str(k): v if (type(v) is str or v is None or type(v) is bool)
                else _plain(v, depth + 1) for k, v in value.items()}
    if kind is int:
        return value if -JSON_SAFE_INT <= value <= JSON_SAFE_INT else str(value)
    if (kind is list or kind is tuple) and depth < 32:  # as for dicts: text, null and booleans without a call
        return [v if (type(v) is str or v is None or type(v) is bool) else _plain(v, depth + 1) for v in value]
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -JSON_SAFE_INT <= value <= JSON_SAFE_INT else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return repr(value)  # not tnetstring-able: the record cannot hold it either, and the comparison says so


def _address(value) -> list | None:
    return None if value is None else [_plain(v) for v in value]


def _metadata_claims(claims: dict, metadata: Mapping) -> None:
    keys = sorted(k for k in metadata if isinstance(k, str) and k.startswith(METADATA_PREFIX))
    claims["metadata.keys"] = keys
    for key in keys:
        claims[f"metadata.{key}"] = _plain(metadata[key])


def claims_of_flow(flow, request_content: tuple | None = None) -> dict:
    """The claims of a live mitmproxy HTTPFlow (the audit log, as the flow recorder takes the flow's record).
    request_content: (the request's content, its SHA-256) as the intent entry hashed it, taken if the request
    still has that very content."""
    request, response, error, websocket = flow.request, flow.response, flow.error, getattr(flow, "websocket", None)
    req = request.data
    claims = {
        "request.method": _text(req.method),
        "request.scheme": _text(req.scheme),
        "request.authority": _text(req.authority),
        "request.host": req.host,
        "request.port": req.port,
        "request.path": _text(req.path),  # the path and the query
        "request.http_version": _text(req.http_version),
        "request.headers": _flow_headers(req.headers.fields),
        "request.trailers": _flow_headers(req.trailers.fields) if req.trailers is not None else None,
        "request.content": sha256_hex(req.content, request_content),  # the content as sent (raw_content)
        "request.timestamps": [_micros(req.timestamp_start), _micros(req.timestamp_end)],
    }
    if response is not None:
        res = response.data
        claims.update({
            "response.status_code": res.status_code,
            "response.reason": _text(res.reason),
            "response.http_version": _text(res.http_version),
            "response.headers": _flow_headers(res.headers.fields),
            "response.trailers": _flow_headers(res.trailers.fields) if res.trailers is not None else None,
            "response.content": _sha(res.content),
            "response.timestamps": [_micros(res.timestamp_start), _micros(res.timestamp_end)],
        })
    if error is not None:
        claims[ERROR_FIELD] = [error.msg, _micros(error.timestamp)]
    if websocket is not None:
        claims["websocket.messages"] = [
            [int(m.type), bool(m.from_client), _sha(m.content), _micros(m.timestamp), bool(m.dropped), bool(m.injected)]
            for m in websocket.messages
        ]
        claims["websocket.close"] = [websocket.closed_by_client, websocket.close_code, _text(websocket.close_reason),
                                     _micros(websocket.timestamp_end)]
    client = flow.client_conn
    claims["client.peername"] = _address(client.peername) if client is not None else None
    server = flow.server_conn
    claims["server.address"] = _address(server.address) if server is not None else None
    claims["flow.comment"] = flow.comment or None
    _metadata_claims(claims, flow.metadata)
    return claims


def claims_of_state(state: Mapping) -> dict:
    """The claims of a flow record as read back from a flow file (auditgate.audit.flow_files)."""

    def part(name) -> Mapping:
        value = state.get(name)
        return value if isinstance(value, Mapping) else {}

    req = part("request")
    claims = {
        "request.method": _text(req.get("method")),
        "request.scheme": _text(req.get("scheme")),
        "request.authority": _text(req.get("authority")),
        "request.host": _plain(req.get("host")),
        "request.port": _plain(req.get("port")),
        "request.path": _text(req.get("path")),
        "request.http_version": _text(req.get("http_version")),
        "request.headers": _state_headers(req.get("headers")),
        "request.trailers": _state_headers(req.get("trailers")),
        "request.content": _sha(req.get("content")) if isinstance(req.get("content"), bytes) else None,
        "request.timestamps": [_state_micros(req.get("timestamp_start")), _state_micros(req.get("timestamp_end"))],
    }
    if isinstance(state.get("response"), Mapping):
        res = part("response")
        claims.update({
            "response.status_code": _plain(res.get("status_code")),
            "response.reason": _text(res.get("reason")),
            "response.http_version": _text(res.get("http_version")),
            "response.headers": _state_headers(res.get("headers")),
            "response.trailers": _state_headers(res.get("trailers")),
            "response.content": _sha(res.get("content")) if isinstance(res.get("content"), bytes) else None,
            "response.timestamps": [_state_micros(res.get("timestamp_start")),
                                    _state_micros(res.get("timestamp_end"))],
        })
    error = state.get("error")
    if isinstance(error, Mapping):
        claims[ERROR_FIELD] = [_plain(error.get("msg")), _state_micros(error.get("timestamp"))]
    websocket = state.get("websocket")
    if isinstance(websocket, Mapping):
        messages = websocket.get("messages") if isinstance(websocket.get("messages"), _SEQ) else []
        claims["websocket.messages"] = [_state_message(m) for m in messages]
        claims["websocket.close"] = [_plain(websocket.get("closed_by_client")), _plain(websocket.get("close_code")),
                                     _text(websocket.get("close_reason")),
                                     _state_micros(websocket.get("timestamp_end"))]
    client, server = part("client_conn"), part("server_conn")
    claims["client.peername"] = _address(client.get("peername")) if isinstance(client.get("peername"), _SEQ) else None
    claims["server.address"] = _address(server.get("address")) if isinstance(server.get("address"), _SEQ) else None
    claims["flow.comment"] = _plain(state.get("comment")) or None
    metadata = state.get("metadata")
    _metadata_claims(claims, metadata if isinstance(metadata, Mapping) else {})
    return claims


_SEQ = (list, tuple)  # lists as read back from a flow file; tuples in a state not written yet


def _state_micros(value) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _micros(value)
    return _plain(value)  # not a timestamp at all: kept as is, so it differs


def _state_headers(value) -> list | None:
    if value is None:
        return None
    if not isinstance(value, _SEQ) or not all(isinstance(f, _SEQ) and len(f) == 2 for f in value):
        return [_plain(value)]  # not mitmproxy's shape: kept, so it differs
    return _headers(value)


def _state_message(message) -> list:
    if not isinstance(message, _SEQ) or len(message) != 6:
        return [_plain(message)]
    kind, from_client, content, timestamp, dropped, injected = message
    return [_plain(kind), _plain(from_client), _sha(content) if isinstance(content, bytes) else _plain(content),
            _state_micros(timestamp), _plain(dropped), _plain(injected)]


def field_digest(value) -> str:
    """SHA-256 of the value's RFC 8785 canonical JSON."""
    data = _fast_json_bytes(value)
    if data is None:
        try:
            data = _json_text(value).encode("utf-8")
        except (CanonicalJsonError, UnicodeEncodeError):  # text no JSON holds (a lone surrogate from a damaged file)
            data = repr(value).encode("utf-8", "backslashreplace")
    return hashlib.sha256(data).hexdigest()


def _fast_json_bytes(value) -> bytes | None:
    """The bytes _json_text() gives, from orjson or one call of the C encoder, for the common claims (text,
    and lists and objects of text and integers); None where the careful path must decide (characters above
    U+FFFF, which RFC 8785 orders its own way in keys, lone surrogates, anything the encoders refuse)."""
    data = sorted_json(value)
    if data is not None:
        return None if not data.isascii() and _ASTRAL.search(data) else data
    text = _fast_text(value)
    return None if text is None else _utf8_unless_astral(text)


def _fast_text(value) -> str | None:
    """The JSON text of text, lists and objects from the C escaper and encoder (see _fast_json_bytes); None
    for any other value, or one the encoder refuses."""
    kind = type(value)
    if kind is str:
        return _escape(value)
    if kind is list or kind is dict:
        try:
            return "".join(encode_sorted(value, 0))
        except (TypeError, ValueError, RecursionError):
            return None
    return None


def _utf8_unless_astral(text: str) -> bytes | None:
    """The UTF-8 of text from the C encoder, or None where the careful path must decide (see _fast_json_bytes)."""
    if text.isascii():
        return text.encode("ascii")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return None if _ASTRAL.search(data) else data


def _json_text(value) -> str:
    """RFC 8785 text of a claim. Strings are escaped as Python's json escapes them (the same as RFC 8785);
    objects, whose keys RFC 8785 orders its own way, go through jcs()."""
    kind = type(value)
    if kind is str:
        return _escape(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int and -JSON_SAFE_INT <= value <= JSON_SAFE_INT:
        return str(value)
    if kind is list:
        return "[" + ",".join(map(_json_text, value)) + "]"
    return jcs(value, ints_checked=True).decode("utf-8")  # _plain() made every integer safe


_escape = json.encoder.encode_basestring  # the C escaper json.dumps(ensure_ascii=False) uses
# Lists and objects in one call (chain.encode_sorted: jcs()'s C encoder): strings escaped by the same C escaper,
# integers in decimal, keys sorted by code point (the same as RFC 8785 while no key holds a character above
# U+FFFF, which _ASTRAL sends back).
_ASTRAL = re.compile(rb"[\xf0-\xf4]")  # the lead byte of a 4-byte UTF-8 sequence


def record_digest(claims: Mapping) -> dict:
    """{"sha256": the record digest, "fields": {field: short digest}} over the claims that are not null."""
    return _record_of(field_digests(claims))


def field_digests(claims: Mapping) -> dict:
    """{field: field_digest(value)} for the claims that are not null."""
    full = {}
    remembered, scalars, sha256 = _last_digests, _last_scalars, hashlib.sha256
    for name, value in claims.items():  # field_digest(), its common case written out: 30 claims a flow
        if value is None:
            continue
        # Most claims are the same flow after flow (method, host, status, identity, instance...): the digest the
        # field had last time is taken again where its value (exactly a str or an int: never True for 1) or its
        # JSON is the same. A str never equals an int, so the two cannot stand for each other.
        kind = type(value)
        scalar = kind is str or kind is int
        if scalar:
            last = scalars.get(name)
            if last is not None and last[0] == value:
                full[name] = last[1]
                continue
        data = sorted_json(value)
        if data is None or (not data.isascii() and _ASTRAL.search(data)):
            full[name] = field_digest(value)
            continue
        last = None if scalar else remembered.get(name)
        if last is not None and last[0] == data:
            full[name] = last[1]
            continue
        digest = full[name] = sha256(data).hexdigest()
        if len(data) <= _MEMO_TEXT:
            memo = scalars if scalar else remembered
            if name in memo or len(memo) < 4096:
                memo[name] = (value if scalar else data, digest)  # one tuple, replaced whole (safe from any thread)
    return full


def _record_of(full: dict) -> dict:
    """The record digest and the short digests of {field: full digest}."""
    return {"sha256": hashlib.sha256(_digests_jcs(full)).hexdigest(),
            "fields": {name: digest[:SHORT_DIGEST] for name, digest in full.items()}}


def record_of_flow(flow, request_content: tuple | None = None) -> dict:
    """record_digest(claims_of_flow(flow, request_content)): the record entry's whole-flow digest."""
    return _record_of(field_digests(claims_of_flow(flow, request_content)))


_last_digests: dict[str, tuple[bytes, str]] = {}  # field name -> (its value's JSON, that JSON's digest), last seen
_last_scalars: dict[str, tuple[str | int, str]] = {}  # field name -> (its text or integer, its digest), last seen
_MEMO_TEXT = 2048  # longer JSON is not kept: the fields that repeat are short; a hostile flow file's need not be


def _digests_jcs(full: dict) -> bytes:
    """jcs(full) for {field name: hex digest}: orjson's sorted JSON where every name is ASCII (RFC 8785 orders
    characters above U+FFFF its own way), jcs() itself else."""
    data = sorted_json(full)
    if data is None or not data.isascii():
        return jcs(full, ints_checked=True)
    return data


def differing_fields(audited: Mapping, recorded: Mapping) -> list[str]:
    """The fields whose short digests differ (or that only one side has), in the audited entry's order."""
    audited_fields = audited.get("fields") if isinstance(audited.get("fields"), Mapping) else {}
    recorded_fields = recorded.get("fields") if isinstance(recorded.get("fields"), Mapping) else {}
    names = list(audited_fields) + [n for n in recorded_fields if n not in audited_fields]
    return [n for n in names if audited_fields.get(n) != recorded_fields.get(n)]
