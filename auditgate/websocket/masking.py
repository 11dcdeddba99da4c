"""Masking server events one in, one out, with the SSE streams' bounded hold-back per text stream.

A WebSocket message is one event; the gateway never adds one (an event it injected would reach the
client after events the upstream sent meanwhile, out of order). So each event goes out as one event:
a ``*.delta`` carries what its text stream released (maybe less than came in: the tail that could
still grow into an e-mail address, a number or a key is held back, and comes with the next delta), and
the ``*.done``, the finished item and the finished response carry the whole masked text, held tail
included. The streams are ``auditgate.masking.stream``'s: the same channels (per item and content
part), the same hold-back, the same walker for every other field, so a value split across deltas is
caught exactly as in an SSE stream.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from auditgate.masking.engine import Span
from auditgate.masking.payload import mask_leaves
from auditgate.masking.stream import SseStreamMasker, TextStreamMasker
from auditgate.websocket.events import AUDIO_FIELDS, RESPONSE_END_EVENTS

# More text streams than this open at once and the masker starts afresh (a session that never ends a response).
MAX_CHANNELS = 4096


class EventMasker:
    """Masks the server events of one session.

    ``mask_sync(text, path)`` masks a whole text and returns (masked text, entity types found);
    ``new_text_masker(path)`` makes one text stream's hold-back masker. ``findings`` counts entity
    types over the session, ``response_findings`` since the current response began.
    """

    def __init__(self, new_text_masker: Callable[[str], TextStreamMasker],
                 mask_sync: Callable[[str, str], tuple[str, list[str]]]) -> None:
        self._new_text_masker = new_text_masker
        self._mask_sync = mask_sync
        self._channels: list[tuple[TextStreamMasker, list[int]]] = []  # (channel, [findings counted])
        self._sse = self._fresh()
        self.findings: Counter[str] = Counter()
        self.response_findings: Counter[str] = Counter()
        self.response_messages = 0

    def _fresh(self) -> SseStreamMasker:
        self._channels = []

        def channel(path: str) -> TextStreamMasker:
            made = self._new_text_masker(path)
            self._channels.append((made, [0]))
            return made

        return SseStreamMasker(channel, self._whole, 1 << 62, 1 << 62)

    def _whole(self, text: str, path: str) -> str:
        masked, found = self._mask_sync(text, path)
        self._found(found)
        return masked

    def _found(self, entities: list[str]) -> None:
        if entities:
            self.findings.update(entities)
            self.response_findings.update(entities)

    def mask(self, event: dict) -> dict:
        """The event to send for ``event`` (a dict with a string "type")."""
        kind = event["type"]
        self.response_messages += 1
        audio_field = AUDIO_FIELDS.get(kind)
        if audio_field is not None and isinstance(event.get(audio_field), str):
            # Base64 audio: not text, passed as it came; every other field is walked.
            rest = mask_leaves({k: v for k, v in event.items() if k != audio_field}, "event", self._whole)
            rest[audio_field] = event[audio_field]
            return rest
        sequence = event.get("sequence_number")
        masked = self._sse.mask_event(event)[-1]  # a flushed tail is in the .done's whole text
        if "sequence_number" in masked:
            masked["sequence_number"] = sequence  # one in, one out: the upstream's numbering holds
        for channel, counted in self._channels:
            if len(channel.findings) > counted[0]:
                self._found(channel.findings[counted[0]:])
                counted[0] = len(channel.findings)
        if kind in RESPONSE_END_EVENTS or len(self._channels) > MAX_CHANNELS:
            # The response is over: its text streams are closed, the next response starts afresh.
            self._sse = self._fresh()
        return masked

    def end_response(self) -> tuple[Counter[str], int]:
        """The findings and message count of the response just finished; the next one starts at zero."""
        found, count = self.response_findings, self.response_messages
        self.response_findings, self.response_messages = Counter(), 0
        return found, count


def key_scrubbing_masker(echoes) -> EventMasker:
    """An EventMasker whose only entity is the gateway's upstream key (``auditgate.routing.key_echo``)."""
    from auditgate.routing.key_echo import ENTITY, marker

    def find(text: str) -> list[Span]:
        return [Span(ENTITY, start, end, 1.0) for start, end in echoes.spans(text)]

    def apply(text: str, spans: list[Span]) -> str:
        out, at = [], 0
        for span in sorted(spans, key=lambda s: s.start):
            if span.start < at:
                continue
            out += [text[at:span.start], marker(span.end - span.start)]
            at = span.end
        return "".join(out) + text[at:]

    def text_scrubber(path: str) -> TextStreamMasker:
        return TextStreamMasker(find, apply, max(echoes.longest - 1, 1), path)

    def scrub_sync(text: str, path: str) -> tuple[str, list[str]]:
        scrubbed, found = echoes.scrub_text(text)
        return scrubbed, [ENTITY] * found

    return EventMasker(text_scrubber, scrub_sync)
