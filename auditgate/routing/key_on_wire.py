"""The upstream key exists only in the bytes mitmproxy writes to the upstream, never on a flow.

mitmweb serves the flows it holds (``GET /flows``, its websocket, its exports) as they are at that
moment, and a request waiting for a slow or held upstream would show whatever key sits in its
headers. So key custody puts a placeholder on the flow, and the real value is swapped in where
mitmproxy turns the request into bytes for the upstream: ``Http1Client.send`` (HTTP/1, on a copy of
the request that lives only in the connection layer) and ``format_h2_request_headers`` (HTTP/2 and
HTTP/3, on the header list handed to the h2/h3 library). A placeholder that reaches the upstream by
any other path only fails its authentication: the key is never where it should not be.

The same places see an upstream's reply first: its headers are scrubbed of any key as they are
parsed (``http1.read_response_head``, ``parse_h2_response_headers``) and a buffered body just before
mitmproxy puts it on the flow (``HttpStream.state_consume_response_body``), so no hook and no viewer
ever holds an echoed key either.

mitmproxy offers no hook for any of this; these functions are swapped while key custody is loaded and
put back when it is unloaded (``install`` / ``uninstall``, counted, so two loaded copies share them).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import weakref
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import (
    RequestHeaders,
    ResponseEndOfMessage,
    _http1,
    _http2,
    _http3,
)

from auditgate.routing.key_echo import KeyEchoes

logger = logging.getLogger(__name__)

# What the flow holds where the key goes: mitmweb, the records and every hook see this, never the key.
PLACEHOLDER = "auditgate-upstream-key-added-on-the-wire"


@dataclasses.dataclass(slots=True)
class _Pending:
    request: weakref.ref
    header: bytes  # lowercased name
    placeholder: bytes
    value: bytes


class WireKeys:
    """The requests waiting to go out with a key, and the key each gets on the wire."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self.echoes = KeyEchoes(())  # the keys to take out of replies

    def attach(self, request: http.Request, header: str, value: str, placeholder: str) -> None:
        """Put ``placeholder`` in ``header`` on the request; ``value`` replaces it only on the wire."""
        request.headers[header] = placeholder
        ident = id(request)

        def gone(ref: weakref.ref, ident: int = ident) -> None:
            entry = self._pending.get(ident)
            if entry is not None and entry.request is ref:
                del self._pending[ident]

        self._pending[ident] = _Pending(weakref.ref(request, gone), header.lower().encode(),
                                        placeholder.encode(), value.encode())

    def detach(self, request: http.Request) -> None:
        entry = self._pending.get(id(request))
        if entry is not None and entry.request() is request:
            del self._pending[id(request)]

    def _entry(self, request: http.Request) -> _Pending | None:
        entry = self._pending.get(id(request))
        return entry if entry is not None and entry.request() is request else None

    def on_wire_fields(self, request: http.Request, fields):
        """The header fields as they go out: the placeholder replaced by the key. ``fields`` unchanged if none."""
        entry = self._entry(request)
        if entry is None:
            return fields
        return [(name, entry.value) if name.lower() == entry.header and value == entry.placeholder else (name, value)
                for name, value in fields]

    def on_wire_request(self, request: http.Request) -> http.Request:
        """A copy of the request with the key in place of the placeholder (the copy never reaches a flow)."""
        entry = self._entry(request)
        if entry is None:
            return request
        # Shallow: the same body and fields, a headers object of its own (request.copy() would copy the
        # whole body, and check every field's type, for each request).
        wired = _shallow_copy(request)
        wired.data = _shallow_copy(request.data)
        # The fields are the request's own (already checked to be bytes) with the key's value in bytes:
        # Headers() would only check each of them again.
        headers = http.Headers.__new__(http.Headers)
        headers.fields = tuple(self.on_wire_fields(request, request.headers.fields))
        wired.data.headers = headers
        return wired

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ---- replies -----------------------------------------------------------------------------------
    def scrub_headers(self, headers: http.Headers) -> int:
        """Take every key out of the header names and values; how many were found."""
        echoes = self.echoes
        if not echoes:
            return 0
        fields = headers.fields
        if not echoes.occurs_in(b"\n".join(part for field in fields for part in field)):
            return 0  # no key in any name or value (each is in the joined head): nothing to rewrite
        found, fields = 0, []
        for name, value in headers.fields:
            value, in_value = echoes.scrub(value)
            new_name, in_name = echoes.scrub(name)
            if in_name:  # a header name must stay a token: the marker's brackets are not allowed in one
                new_name = b"x-upstream-key-removed"
            found += in_value + in_name
            fields.append((new_name, value))
        if found:
            headers.fields = tuple(fields)
        return found

    def scrub_response_head(self, response: http.Response) -> int:
        found = self.scrub_headers(response.headers)
        if self.echoes and response.data.reason:
            response.data.reason, in_reason = self.echoes.scrub(response.data.reason)
            found += in_reason
        return found


WIRE = WireKeys()


_plain_types: dict[type, bool] = {}


def _shallow_copy(obj):
    """copy.copy() of a plain object (a mitmproxy Request or its data: a __dict__, no __copy__, no
    __setstate__ or __reduce__ of its own), without copy's general protocol (__reduce_ex__), which
    costs a few microseconds each; any other object goes through copy.copy()."""
    cls = type(obj)
    plain = _plain_types.get(cls)
    if plain is None:
        plain = _plain_types[cls] = (
            not hasattr(cls, "__copy__") and not hasattr(cls, "__setstate__") and not hasattr(cls, "__slots__")
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is object.__getstate__)
    if not plain:
        return copy.copy(obj)
    new = object.__new__(cls)
    new.__dict__.update(obj.__dict__)
    return new


# ---- the swapped functions ------------------------------------------------------------------------------
_originals: dict[tuple[object, str], Callable] = {}
_installs = 0


def _replacements() -> list[tuple[object, str, Callable]]:
    send = _originals[(_http1.Http1Client, "send")]
    format_h2 = _originals[(_http2, "format_h2_request_headers")]
    read_response_head = _originals[(http1, "read_response_head")]
    parse_h2 = _originals[(_http2, "parse_h2_response_headers")]
    consume = _originals[(http_layers.HttpStream, "state_consume_response_body")]

    # A failure in these must not crash mitmproxy's connection: a request whose key could not be put
    # in goes out with the placeholder (the upstream refuses it), and a reply whose scrub failed here
    # is scrubbed again by key custody's hooks before anything of it reaches the caller or a record.
    def http1_send(self, event):
        if isinstance(event, RequestHeaders):
            try:
                wired = WIRE.on_wire_request(event.request)
            except Exception:
                logger.exception("the upstream key could not be put on a request; it goes without")
                wired = event.request
            if wired is not event.request:
                event = dataclasses.replace(event, request=wired)
        return (yield from send(self, event))

    def format_h2_request_headers(context, event):
        fields = yield from format_h2(context, event)
        try:
            return WIRE.on_wire_fields(event.request, fields)
        except Exception:
            logger.exception("the upstream key could not be put on a request; it goes without")
            return fields

    def _scrubbed_head(scrub, what) -> None:
        try:
            if scrub(what):
                logger.warning("removed the upstream key from the headers of a reply")
        except Exception:
            logger.exception("scrubbing the headers of a reply failed here; key custody's hook scrubs them")

    def http1_read_response_head(lines):
        response = read_response_head(lines)
        _scrubbed_head(WIRE.scrub_response_head, response)
        return response

    def parse_h2_response_headers(h2_headers):
        status_code, headers = parse_h2(h2_headers)
        _scrubbed_head(WIRE.scrub_headers, headers)
        return status_code, headers

    def state_consume_response_body(self, event):
        # The whole body is in the buffer now; mitmproxy puts it on the flow next. A body in a
        # content-encoding is scrubbed again, decoded, by key custody's response hook.
        if isinstance(event, ResponseEndOfMessage) and self.response_body_buf and WIRE.echoes:
            try:
                body, found = WIRE.echoes.scrub(bytes(self.response_body_buf))
                if found:  # same length: the Content-Length mitmproxy read still holds
                    self.response_body_buf.clear()
                    self.response_body_buf += body
                    logger.warning("removed the upstream key from the body of a reply")
            except Exception:
                logger.exception("scrubbing the body of a reply failed here; key custody's hook scrubs it")
        return (yield from consume(self, event))

    return [
        (_http1.Http1Client, "send", http1_send),
        (_http2, "format_h2_request_headers", format_h2_request_headers),
        (_http3, "format_h2_request_headers", format_h2_request_headers),
        (http1, "read_response_head", http1_read_response_head),
        (_http2, "parse_h2_response_headers", parse_h2_response_headers),
        (_http3, "parse_h2_response_headers", parse_h2_response_headers),
        (http_layers.HttpStream, "state_consume_response_body", state_consume_response_body),
    ]


_TARGETS = (
    (_http1.Http1Client, "send"), (_http2, "format_h2_request_headers"), (_http3, "format_h2_request_headers"),
    (http1, "read_response_head"), (_http2, "parse_h2_response_headers"), (_http3, "parse_h2_response_headers"),
    (http_layers.HttpStream, "state_consume_response_body"),
)


def missing_internals() -> list[str]:
    """The mitmproxy internals this module swaps that this mitmproxy does not have."""
    return [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in _TARGETS if not hasattr(owner, name)]


def install() -> None:
    """Swap the functions in (once, however many addons ask)."""
    global _installs
    _installs += 1
    if _installs > 1:
        return
    for owner, name in _TARGETS:
        _originals[(owner, name)] = getattr(owner, name)
    for owner, name, replacement in _replacements():
        setattr(owner, name, replacement)


def uninstall() -> None:
    """Put mitmproxy's own functions back once the last addon that asked is unloaded."""
    global _installs
    if _installs == 0:
        return
    _installs -= 1
    if _installs:
        return
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()


def installed() -> bool:
    return _installs > 0


__all__ = ["PLACEHOLDER", "WIRE", "WireKeys", "install", "uninstall", "installed", "missing_internals"]
