"""Masking server events with the SSE streams' bounded hold-back per text stream.

A WebSocket message is one event. Each event goes out as the events ``EventMasker.mask`` returns for
it, in order: usually one; a ``*.delta`` carries what its text stream released (maybe less than came
in: the tail that could still grow into an e-mail address, a number or a key is held back, and comes
with the next delta); a delta whose text is all held back goes out as nothing (no empty deltas); and
an event that ends text streams (a ``.done``, an input transcription's ``.completed``, a finished
response) is preceded by one more delta per stream carrying its held tail. So the deltas a client adds
up equal the final text, as over HTTP. ``sequence_number`` is renumbered so each response's events stay
contiguous (events added or left out shift it). The streams are ``auditgate.masking.stream``'s: the
same channels (per item and content part), the same hold-back, the same walker for every other field,
so a value split across deltas is caught exactly as in an SSE stream. Sending more or fewer messages
than came is the gateway's part (``auditgate.websocket.session``: the latest message stands for the
events it expanded into; websocket_gate sends them in order).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from auditgate.masking.payload import mask_leaves
from auditgate.masking.stream import (
    SseStreamMasker,
    TextStreamMasker,
    is_plain_event_name,
)
from auditgate.websocket.events import AUDIO_FIELDS, RESPONSE_END_EVENTS, response_id_of

# More text streams than this open at once and the masker starts afresh (a session that never ends a response).
MAX_CHANNELS = 4096
# Realtime's input transcription streams in ``.delta`` events and ends with ``.completed`` (not ``.done``).
COMPLETED_STREAMS = frozenset({"conversation.item.input_audio_transcription.completed"})


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
        self._next_seq: int | None = None

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

    def mask(self, event: dict) -> list[dict]:
        """The events to send for ``event`` (a dict with a string "type"), in order (see the module doc)."""
        kind = event["type"]
        if not is_plain_event_name(kind):
            # As the SSE side masks event names: a type that is not dotted words is masked like any text
            # (an API's own types always are dotted words, so a known event is never renamed).
            event = dict(event, type=self._whole(kind, "event.type"))
            kind = event["type"]
        self.response_messages += 1
        audio_field = AUDIO_FIELDS.get(kind)
        if audio_field is not None and isinstance(event.get(audio_field), str):
            # Base64 audio: not text, passed as it came; every other field is walked.
            rest = mask_leaves({k: v for k, v in event.items() if k != audio_field}, "event", self._whole)
            rest[audio_field] = event[audio_field]
            return self._numbered([rest], kind)
        ends_response = kind in RESPONSE_END_EVENTS
        ended = self._streams_of(response_id_of(event)) if ends_response else []
        out = [tail for key in ended for tail in self._sse._flush(key)]
        if kind in COMPLETED_STREAMS:
            # Masked as the .done of its delta stream (the held tail first), sent with its own type.
            done = dict(event, type=kind.removesuffix(".completed") + ".done")
            out += self._sse.mask_event(done)
            out[-1]["type"] = kind
            self._close_stream(SseStreamMasker._key(done, kind.removesuffix(".completed")))
        else:
            out += self._sse.mask_event(event)
        for channel, counted in self._channels:
            if len(channel.findings) > counted[0]:
                self._found(channel.findings[counted[0]:])
                counted[0] = len(channel.findings)
        out = _merged([e for e in out if not _empty_delta(e)])
        for tail in out[:-1]:  # the held tails put before the event: ids of their own
            if isinstance(tail.get("event_id"), str):
                tail["event_id"] += "_held"
        numbered = self._numbered(out, kind)
        if ends_response or len(self._channels) > MAX_CHANNELS:
            self._restart(set(ended), keep_others=len(self._channels) <= MAX_CHANNELS)
        return numbered

    # SseStreamMasker keeps its text streams by key (base event type, item, content index) in _channels,
    # the shape of each stream's deltas in _templates, and flushes one with _flush(key).
    def _streams_of(self, response_id: str | None) -> list[tuple]:
        """The text streams a response's end ends: those of that response (Realtime deltas name theirs; a
        Responses API session runs one response at a time, its deltas name none)."""
        # SseStreamMasker flushes a stream at its own .done or item; a response that ends without them
        # (cancelled, failed, a Realtime response.done) would keep the tail: flushed first, in stream order.
        # Another response still streaming (Realtime runs them side by side) keeps its streams and tails.
        return [key for key in self._sse._channels if key[0].startswith("response.")
                and self._sse._templates.get(key, {}).get("response_id") in (None, response_id)]

    def _close_stream(self, key: tuple) -> None:
        channel = self._sse._channels.pop(key, None)
        self._sse._templates.pop(key, None)
        self._channels = [(c, n) for c, n in self._channels if c is not channel]

    def _restart(self, ended: set[tuple], keep_others: bool) -> None:
        """The response is over: its text streams are closed, and what it kept is let go. A stream outside
        it (another response's, a Realtime input transcription still arriving) goes on in the fresh masker."""
        old, counted = self._sse, {id(c): n for c, n in self._channels}
        self._sse = self._fresh()
        if not keep_others:
            return
        for key, channel in old._channels.items():
            if key not in ended and id(channel) in counted:
                self._sse._channels[key] = channel
                if key in old._templates:
                    self._sse._templates[key] = old._templates[key]
                self._channels.append((channel, counted[id(channel)]))

    def _numbered(self, events: list[dict], kind: str) -> list[dict]:
        for event in events:
            if isinstance(event.get("sequence_number"), int):
                if self._next_seq is None:
                    self._next_seq = event["sequence_number"]
                event["sequence_number"] = self._next_seq
                self._next_seq += 1
        if kind in RESPONSE_END_EVENTS:
            self._next_seq = None  # each response numbers its events afresh (from its first event's number)
        return events

    def end_response(self) -> tuple[Counter[str], int]:
        """The findings and message count of the response just finished; the next one starts at zero."""
        found, count = self.response_findings, self.response_messages
        self.response_findings, self.response_messages = Counter(), 0
        return found, count


def _empty_delta(event: dict) -> bool:
    return event["type"].endswith(".delta") and event.get("delta") == "" and event["type"] not in AUDIO_FIELDS


def _merged(events: list[dict]) -> list[dict]:
    """Consecutive deltas of one text stream as one delta (a held tail right after the delta before it)."""
    out: list[dict] = []
    for event in events:
        previous = out[-1] if out else None
        if (previous is not None and event["type"].endswith(".delta") and isinstance(event.get("delta"), str)
                and isinstance(previous.get("delta"), str)
                and {k: v for k, v in previous.items() if k not in _DELTA_OWN}
                == {k: v for k, v in event.items() if k not in _DELTA_OWN}):
            previous["delta"] += event["delta"]
            continue
        out.append(event)
    return out


_DELTA_OWN = frozenset({"delta", "sequence_number", "event_id", "logprobs", "obfuscation"})


def key_scrubbing_masker(echoes) -> EventMasker:
    """An EventMasker whose only entity is the gateway's upstream key (``auditgate.routing.key_echo``)."""
    from auditgate.routing.key_echo import ENTITY, text_scrubbers

    def scrub_sync(text: str, path: str) -> tuple[str, list[str]]:
        scrubbed, found = echoes.scrub_text(text)
        return scrubbed, [ENTITY] * found

    return EventMasker(text_scrubbers(echoes), scrub_sync)
