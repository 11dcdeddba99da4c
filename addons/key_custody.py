"""Holds the upstream key: on the wire to the upstream only, and out of every reply, header and stream.

On the way out: the caller's headers are cut down to what the upstream's entry forwards (its
``forward_headers``, the SDKs' own by default), OpenAI-Organization and OpenAI-Project are the
entry's, and the key goes on as a placeholder that becomes the key only in the bytes mitmproxy writes
to the upstream (``auditgate.routing.key_on_wire``): no flow, and so no mitmweb view, hook or record,
ever holds it. On the way back: any configured key echoed by the upstream (in any shape) is taken out
of the reply's headers, redirect target, body and stream, before the caller and the records see it.
"""

from __future__ import annotations

import logging

from mitmproxy import exceptions, http
from mitmproxy.proxy.mode_specs import ReverseMode

from auditgate.core.credentials import (
    remove_credential_headers,
    remove_identity_headers,
)
from auditgate.core.flow_contract import GUARD, KEY_HEADER, REFUSAL
from auditgate.core.options import add_gateway_options, load_rules
from auditgate.core.refusal import is_answered, refuse
from auditgate.core.request_facts import facts_of, header_value, is_event_stream
from auditgate.routing import key_echo, key_on_wire
from auditgate.routing.key_echo import (
    KeyEchoes,
    ReplyStreamScrubber,
    as_stream_result,
    chunks_of,
    scrub_json,
)
from auditgate.routing.key_on_wire import PLACEHOLDER, WIRE
from auditgate.routing.upstreams import (
    DEFAULT_KEY_ENV,
    Upstream,
    UpstreamTable,
    shared_upstreams,
)
from auditgate.transport import limits
from auditgate.transport.inflate import content_codings
from auditgate.websocket import session, session_control
from auditgate.websocket.events import NotAnEvent, dump, parse
from auditgate.websocket.masking import EventMasker, key_scrubbing_masker

logger = logging.getLogger("auditgate.addons.key_custody")

STREAM_FAILED = (502, "gateway_key_custody_failed")


class _ScrubbedStream:
    """The stream callable of a streamed reply: whatever was there before (masking's, a byte cap), then the scrub.

    To the addons that set the earlier callable it still looks like theirs while the stream runs
    (``isinstance`` and its attributes, e.g. body_limits' cap and whether it was exceeded), and once the
    stream has ended it is put back in its place (masking checks that its own callable is the one set).
    """

    def __init__(self, flow: http.HTTPFlow, inner, scrubber: ReplyStreamScrubber, kind: str) -> None:
        self.flow, self.inner, self.scrubber, self.kind = flow, inner, scrubber, kind
        self.failed = False

    @property
    def __class__(self):  # isinstance() consults __class__: the earlier addon's checks still find their callable
        return type(self.inner) if self.inner is not None else _ScrubbedStream

    def __getattr__(self, name: str):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __call__(self, data: bytes) -> list[bytes]:
        if self.failed:
            return []  # after the error event nothing more goes out
        out: list[bytes] = []
        try:
            chunks = chunks_of(self.inner(data)) if callable(self.inner) else ([data] if data else [])
            out = [self.scrubber.feed(chunk) for chunk in chunks]
            if not data:
                out.append(self.scrubber.finish())
        except Exception as e:  # fail closed: what was scrubbed may go, then the error event, then nothing
            self.failed = True
            logger.error("scrubbing the upstream key from a stream of %s failed: %s", self.flow.request.pretty_host,
                         type(e).__name__, exc_info=not isinstance(e, ValueError))
            message = "the gateway could not check this stream for its upstream key, so it was ended"
            if not REFUSAL.on(self.flow):
                REFUSAL.set(self.flow, {"status": STREAM_FAILED[0], "code": STREAM_FAILED[1], "message": message})
                self.flow.comment = f"stream cut {STREAM_FAILED[0]} {STREAM_FAILED[1]}"
            return as_stream_result([*out, limits.sse_error_event(self.kind, *STREAM_FAILED, message)])
        if not data:
            self._ended()
        return as_stream_result(out)

    def _ended(self) -> None:
        if self.scrubber.found:
            logger.warning("removed %d echo(es) of the upstream key from a stream from %s", self.scrubber.found,
                           self.flow.request.pretty_host)
        # The stream is over: put back the callable the earlier addons know as theirs (masking notes a
        # stream as masked, body_limits reads its cap, only if they find their own at the response).
        if callable(self.inner) and self.flow.response is not None:
            self.flow.response.stream = self.inner


class KeyCustody:
    """Puts the upstream key on at the wire (callers never hold it) and takes any echo of it out of replies."""

    def __init__(self) -> None:
        self.table: UpstreamTable | None = None
        self._keys: dict[Upstream, str | None] = {}
        self._swapped = False
        self._sessions: dict[str, EventMasker] = {}  # WebSocket flows: the key followed across their deltas

    def load(self, loader) -> None:
        add_gateway_options(loader)
        missing = key_on_wire.missing_internals()
        if missing:
            # Without them the key would have to sit on the flow, where mitmweb and the hooks see it.
            raise exceptions.OptionsError(
                "auditgate: key custody needs mitmproxy internals this mitmproxy lacks: " + ", ".join(missing))
        key_echo.preload()
        if not self._swapped:
            key_on_wire.install()
            self._swapped = True

    def done(self) -> None:
        if self._swapped:
            key_on_wire.uninstall()
            self._swapped = False

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        table = load_rules(shared_upstreams)
        self.table, self._keys = table, {}
        for upstream in table.upstreams:
            if self._key_for(upstream) is None:
                logger.warning(
                    "no key for upstream %s (%s is unset or empty): its requests will be refused with 502",
                    upstream.host,
                    upstream.key_source,
                )
        # A reverse target not listed in upstreams.yaml is sent the default key: look for it in replies too.
        self._key_for(Upstream(host="", key_env=DEFAULT_KEY_ENV))

    def _key_for(self, upstream: Upstream) -> str | None:
        # Read once per upstream: a key in the process environment does not change; rotate by restart.
        if upstream not in self._keys:
            key = self._keys[upstream] = upstream.read_key()
            if key and key not in WIRE.echoes.texts:
                WIRE.echoes = KeyEchoes([k for k in self._keys.values() if k])
        return self._keys[upstream]

    def _upstream_for(self, flow: http.HTTPFlow) -> Upstream | None:
        if self.table is None:
            return None
        return self.table.route(flow.request.host, flow.request.port, isinstance(flow.client_conn.proxy_mode, ReverseMode))

    # ---- the way out ---------------------------------------------------------------------------------
    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        upstream = self._upstream_for(flow)
        key = self._key_for(upstream) if upstream else None
        if upstream is None or key is None:
            where = upstream.key_source if upstream else "the upstream configuration"
            refuse(flow, 502, "gateway_upstream_unavailable", f"the gateway holds no key for this upstream ({where})")
            return
        headers = flow.request.headers
        remove_credential_headers(headers)
        remove_identity_headers(headers)
        forwards = upstream.forwards_field
        kept = tuple(field for field in headers.fields if forwards(field[0]))
        if len(kept) != len(headers.fields):
            dropped = [name for name, _ in headers.fields if not forwards(name)]
            headers.fields = kept
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("not forwarded to %s: %s", upstream.host, ", ".join(sorted({n.decode("latin-1").lower()
                                                                                       for n in dropped})))
        for name, value in upstream.gateway_headers().items():
            headers[name] = value
        # The reply is read for echoes of the key as it arrives, before any hook or viewer holds it: plain
        # bytes can be; a compressed body would carry the key past that first look (see key_on_wire).
        headers["accept-encoding"] = "identity"
        WIRE.attach(flow.request, upstream.key_header, upstream.auth_header_value(key),
                    upstream.auth_header_value(PLACEHOLDER))
        KEY_HEADER.set(flow, upstream.key_header)

    def _take_back(self, flow: http.HTTPFlow) -> None:
        # The request has left by now: its placeholder is of no more use, and the records need not show it.
        WIRE.detach(flow.request)
        header = KEY_HEADER.pop(flow)
        if header:
            flow.request.headers.pop(header, None)

    # ---- the way back --------------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._take_back(flow)
        response = flow.response
        if not flow.live or response is None:
            return
        echoes = WIRE.echoes
        if echoes and WIRE.scrub_response_head(response):
            logger.warning("removed the upstream key from the headers of a reply from %s", flow.request.pretty_host)
        if not echoes:
            return
        inner = response.stream
        event_stream = is_event_stream(response)
        if not inner and not event_stream:
            return  # buffered: scrubbed whole at the response
        if not inner and GUARD.get(flow) is not None:
            return  # an earlier hook failed and took the stream back: the reply is replaced at the response
        self._scrub_stream(flow, response, inner, event_stream)

    def _scrub_stream(self, flow: http.HTTPFlow, response: http.Response, inner, event_stream: bool) -> None:
        kind = "chat" if "/chat/" in flow.request.path else "responses"
        encoding = response.headers.get("content-encoding", "")
        try:
            kind = facts_of(flow).endpoint
            codings = content_codings(encoding)
            scrubber = ReplyStreamScrubber(WIRE.echoes, event_stream=event_stream, codings=codings)
        except Exception as e:  # a coding the gateway cannot read: the stream is ended at once, never passed raw
            logger.warning("a stream from %s cannot be checked for the upstream key: %s", flow.request.pretty_host, e)
            scrubber = _FailingScrubber()
        if encoding:
            response.headers.pop("content-encoding", None)  # the caller gets the scrubbed stream plain
        if response.headers.pop("content-length", None) is not None and response.http_version.startswith("HTTP/1") \
                and "transfer-encoding" not in response.headers:
            response.headers["transfer-encoding"] = "chunked"
        response.stream = _ScrubbedStream(flow, inner if callable(inner) else None, scrubber, kind)

    def response(self, flow: http.HTTPFlow) -> None:
        self._take_back(flow)
        response = flow.response
        if not flow.live or response is None or not WIRE.echoes:
            return
        found = WIRE.scrub_response_head(response)
        if response.trailers:
            found += WIRE.scrub_headers(response.trailers)
        if not response.stream:
            found += self._scrub_body(response)
        if found:
            logger.warning("removed %d echo(es) of the upstream key from a reply from %s", found,
                           flow.request.pretty_host)

    def error(self, flow: http.HTTPFlow) -> None:
        self._take_back(flow)

    @staticmethod
    def _scrub_body(response: http.Response) -> int:
        # An upstream that echoes the key (some error messages quote it) must not hand it to the caller.
        if not response.raw_content:
            return 0
        raw, found = WIRE.echoes.scrub(response.raw_content)
        if found:
            response.raw_content = raw
        if header_value(response.headers, b"content-encoding"):
            body = response.get_content(strict=False) or b""
            body, in_body = WIRE.echoes.scrub(body)
            if in_body:
                response.content = body  # encoded again as the header says, Content-Length set
            found += in_body
        elif found:
            response.headers["content-length"] = str(len(raw))
        return found


    # ---- WebSocket sessions: the key out of every server message --------------------------------------
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        message = flow.websocket.messages[-1]
        if message.from_client or session.record(flow).get("failed"):
            return
        try:
            # Not the gateway's own error event, nor an event it scrubbed already and sends again itself,
            # nor one not sent at all.
            if session.own_kind(flow) not in ("error", session.RESENT) and not message.dropped:
                self._scrub_message(flow, message)
            session.mark(flow, "key_custody")
        except Exception as error:  # never the raw message: dropped, and the session closed
            session_control.fail(flow, "key_custody", error)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._sessions.pop(flow.id, None)

    def _scrub_message(self, flow: http.HTTPFlow, message) -> None:
        """The key out of every event the message stands for (masking may have put a held tail before it)."""
        echoes = WIRE.echoes
        if not echoes:
            return
        found = 0
        contents = session.latest_events(flow)
        out: list[bytes] = []
        for content in contents:
            try:
                event = parse(content, message.is_text)
            except NotAnEvent:
                event = None
            pieces = [content]
            if event is not None:
                # Each text that arrives in deltas is followed across them: a key spelled out over several is
                # caught, and what the scrubber holds back comes as one more delta before the stream's end.
                scrubber = self._sessions.get(flow.id)
                if scrubber is None:
                    scrubber = self._sessions[flow.id] = key_scrubbing_masker(echoes)
                before = sum(scrubber.findings.values())
                scrubbed = scrubber.mask(event)
                found += sum(scrubber.findings.values()) - before
                if scrubbed != [event]:
                    pieces = [dump(e) for e in scrubbed]
            for piece in pieces:
                # Every string of the event as its reader decodes it (a field masking skips, an object key,
                # a key spelled with JSON escapes), then the bytes: whatever else spells it.
                # (Without a backslash every string reads as its bytes: the byte scrub alone finds them all.)
                piece, in_json = scrub_json(echoes, piece) if b"\\" in piece else (piece, 0)
                piece, in_bytes = echoes.scrub(piece)
                found += in_json + in_bytes
                out.append(piece)
        if out != contents:
            session.set_events(flow, out)
        if found:
            session.record(flow)["key_echoes"] += found
            logger.warning("removed %d echo(es) of the upstream key from a WebSocket message from %s", found,
                           flow.request.pretty_host)


class _FailingScrubber:
    """The scrubber of a stream that cannot be read: its first chunk ends it with the error event."""

    found = 0

    def feed(self, data: bytes) -> bytes:
        raise ValueError("the stream's content-encoding cannot be decoded")

    def finish(self) -> bytes:
        return self.feed(b"")


addons = [KeyCustody()]
