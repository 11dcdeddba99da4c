"""The pure logic of auditgate.websocket: endpoints, prompt facts, masking events (deltas adding up to the
final text), the session record, audio, digest."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest

from auditgate.core.shipped import SHIPPED_RULES
from auditgate.masking.engine import Span
from auditgate.masking.stream import TextStreamMasker
from auditgate.policy.loading import match_input
from auditgate.policy.rules import load_policy
from auditgate.routing.key_echo import KeyEchoes
from auditgate.websocket.audio import recorded_form
from auditgate.websocket.events import NotAnEvent, endpoint_of, error_event, parse
from auditgate.websocket.facts import EventFacts
from auditgate.websocket.masking import EventMasker, key_scrubbing_masker
from auditgate.websocket.records import messages_sha256

EMAIL = re.compile(r"[\w.]+@[\w-]+(?:\.[\w-]+)*\.[a-z]{2,}")


def _find(text):
    return [Span("EMAIL_ADDRESS", m.start(), m.end(), 1.0) for m in EMAIL.finditer(text)]


def _apply(text, spans):
    out, at = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        out += [text[at:span.start], "<EMAIL>"]
        at = span.end
    return "".join(out) + text[at:]


def _masker() -> EventMasker:
    return EventMasker(lambda path: TextStreamMasker(_find, _apply, 64, path),
                       lambda text, path: (_apply(text, _find(text)), [s.entity_type for s in _find(text)]))


def _delta(text, kind="response.output_text.delta", **extra):
    return {"type": kind, "item_id": "i1", "output_index": 0, "content_index": 0, "delta": text, **extra}


@pytest.mark.parametrize("path, endpoint", [("/v1/responses", "responses"), ("/v1/realtime?model=x", "realtime"),
                                            ("/openai/v1/realtime/", "realtime"), ("/v1/chat/completions", None),
                                            ("/v1/responses/r1/cancel", None), ("/", None)])
def test_only_the_two_apis_are_governed_endpoints(path, endpoint):
    assert endpoint_of(path) == endpoint


def test_a_message_that_is_not_an_event_is_told_apart():
    for content, text in [(b"\x00\x01", False), (b"not json", True), (b"[1]", True), (b'{"no": "type"}', True)]:
        with pytest.raises(NotAnEvent):
            parse(content, text)
    error = json.loads(error_event("gateway_policy_blocked", "no"))
    assert error == {"type": "error", "error": {"type": "invalid_request_error", "code": "gateway_policy_blocked",
                                                "message": "no", "param": None}}


@pytest.mark.parametrize("event", [
    {"type": "response.create", "model": "gpt", "input": "fix -----BEGIN RSA PRIVATE KEY----- now"},
    {"type": "response.create", "response": {"instructions": "-----BEGIN RSA PRIVATE KEY-----"}},
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "-----BEGIN RSA PRIVATE KEY-----"}]}},
    {"type": "session.update", "session": {"instructions": "-----BEGIN RSA PRIVATE KEY-----"}},
    {"type": "response.steer", "input": "-----BEGIN RSA PRIVATE KEY-----"},
    {"type": "some.future.event", "whatever": {"deep": "-----BEGIN RSA PRIVATE KEY-----"}},
])
def test_every_client_event_carrying_a_prompt_is_decided_by_the_http_rules(event):
    policy = load_policy(SHIPPED_RULES / "policy.yaml")
    facts = EventFacts(event, endpoint="realtime", path="/v1/realtime", method="GET", size=100)
    decision = policy.decide(match_input(facts, {"name": "alice"}, {}, "h", 443))
    assert (decision.action, decision.rule) == ("block", "block-private-keys")


def test_tools_are_found_wherever_the_event_carries_them_and_audio_is_not_text():
    event = {"type": "session.update", "session": {"tools": [{"type": "function", "name": "Run_Shell"}]}}
    assert EventFacts(event, endpoint="realtime", path="/", method="GET", size=1).tool_names == ["run_shell"]
    audio = {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"x" * 30).decode()}
    assert EventFacts(audio, endpoint="realtime", path="/", method="GET", size=1).prompt_texts == []


def _one(events: list[dict]) -> dict:
    [event] = events
    return event


@pytest.mark.parametrize("cut", range(1, 30))
def test_a_value_split_across_deltas_is_masked_and_the_deltas_add_up_to_the_final_text(cut):
    text = "Mail jane.doe@example.com today, thanks."
    masker = _masker()
    out = [*masker.mask({"type": "response.created", "sequence_number": 0, "response": {"id": "r"}}),
           *masker.mask(_delta(text[:cut], sequence_number=1)), *masker.mask(_delta(text[cut:], sequence_number=2)),
           *masker.mask({"type": "response.output_text.done", "item_id": "i1", "output_index": 0,
                         "content_index": 0, "text": text, "sequence_number": 3})]
    deltas = [e["delta"] for e in out if e["type"] == "response.output_text.delta"]
    done = out[-1]
    assert "jane" not in "".join(deltas) and "example.com" not in "".join(deltas)
    # The held tail went out as a last delta before the .done: the deltas add up to the final text.
    assert done["text"] == "Mail <EMAIL> today, thanks." and "".join(deltas) == done["text"]
    assert "" not in deltas  # a delta whose text is all held back is not sent at all
    assert [e["sequence_number"] for e in out] == list(range(len(out)))  # renumbered, contiguous
    completed = _one(masker.mask({"type": "response.completed", "response": {"id": "r", "output": [
        {"id": "i1", "type": "message", "content": [{"type": "output_text", "text": text}]}]}}))
    assert completed["response"]["output"][0]["content"][0]["text"] == done["text"]
    assert masker.end_response()[0] == {"EMAIL_ADDRESS": 1}


def test_a_response_ending_without_its_done_events_still_sends_the_held_tails_first():
    masker = _masker()
    first = masker.mask(_delta("Mail jane.doe@example.com", sequence_number=5))
    ended = masker.mask({"type": "response.cancelled", "sequence_number": 6, "response": {"id": "r"}})
    assert [e["type"] for e in ended] == ["response.output_text.delta", "response.cancelled"]
    assert "".join(e["delta"] for e in [*first, ended[0]]) == "Mail <EMAIL>"
    assert [e["sequence_number"] for e in [*first, *ended]] == list(range(5, 5 + len(first) + 2))


def test_realtime_transcripts_are_masked_and_audio_deltas_pass_as_they_came():
    masker = _masker()
    audio = base64.b64encode(bytes(range(200))).decode()
    assert _one(masker.mask(_delta(audio, "response.output_audio.delta")))["delta"] == audio
    first = masker.mask(_delta("call jane.doe@ex", "response.output_audio_transcript.delta", event_id="e1"))
    second = masker.mask(_delta("ample.com", "response.output_audio_transcript.delta", event_id="e2"))
    done = masker.mask({"type": "response.output_audio_transcript.done", "item_id": "i1", "output_index": 0,
                        "content_index": 0, "transcript": "call jane.doe@example.com", "event_id": "e3"})
    deltas = "".join(e["delta"] for e in [*first, *second, *done[:-1]])
    assert "jane" not in deltas and done[-1]["transcript"] == "call <EMAIL>" == deltas
    assert len({e["event_id"] for e in [*first, *second, *done]}) == len([*first, *second, *done])
    # The input transcription streams too (.delta ... .completed), while a response may end meanwhile.
    heard = [*masker.mask(_delta("I am jane.doe@exa", "conversation.item.input_audio_transcription.delta",
                                 item_id="i2")),
             *masker.mask({"type": "response.done", "response": {"id": "r", "output": []}}),
             *masker.mask(_delta("mple.com", "conversation.item.input_audio_transcription.delta", item_id="i2")),
             *masker.mask({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i2",
                           "content_index": 0, "transcript": "I am jane.doe@example.com"})]
    completed = heard[-1]
    assert completed["type"] == "conversation.item.input_audio_transcription.completed"
    assert completed["transcript"] == "I am <EMAIL>" == "".join(e.get("delta", "") for e in heard
                                                                if e["type"].endswith(".delta"))


def test_the_key_is_scrubbed_across_deltas():
    key = "sk-test-" + "a1" * 24
    scrubber = key_scrubbing_masker(KeyEchoes([key]))
    out = [e for part in ["key: " + key[:10], key[10:30], key[30:] + " x"] for e in scrubber.mask(_delta(part))]
    done = scrubber.mask({"type": "response.output_text.done", "item_id": "i1", "output_index": 0,
                          "content_index": 0, "text": "key: " + key + " x"})
    deltas = "".join(e["delta"] for e in [*out, *done[:-1]])
    assert key[:10] not in deltas and key[10:30] not in deltas and key[30:] not in deltas
    assert key not in done[-1]["text"] and "[upstream-key-removed]" in done[-1]["text"] and deltas == done[-1]["text"]


def test_audio_is_recorded_as_its_size_and_digest():
    audio = base64.b64encode(b"\x01\x02" * 600).decode()
    for event in [{"type": "input_audio_buffer.append", "audio": audio},
                  {"type": "response.output_audio.delta", "delta": audio, "item_id": "i"},
                  {"type": "conversation.item.create", "item": {"content": [{"type": "input_audio", "audio": audio}]}}]:
        recorded = recorded_form(json.dumps(event).encode())
        assert recorded is not None and audio.encode() not in recorded
        assert hashlib.sha256(audio.encode()).hexdigest().encode() in recorded and b'"base64_chars":1600' in recorded
    assert recorded_form(b'{"type":"response.output_text.delta","delta":"hi"}') is None


def test_the_messages_digest_covers_order_direction_and_content():
    messages = [(1, True, b"a", 0.0, False, False), (1, False, b"b", 1.0, False, False)]
    digest = messages_sha256(messages)
    assert digest == messages_sha256([list(m) for m in messages])
    assert digest != messages_sha256(messages[::-1])
    assert digest != messages_sha256([(1, True, b"a", 0.0, True, False), messages[1]])
    assert digest != messages_sha256([messages[0], (1, True, b"b", 1.0, False, False)])


def test_function_call_arguments_stream_to_the_same_text_as_their_done_and_item():
    masker = _masker()
    where = {"item_id": "fc1", "output_index": 1}
    out = [e for part in ['{"to": "jane.d', 'oe@example.com"}']
           for e in masker.mask({"type": "response.function_call_arguments.delta", **where, "delta": part})]
    out += masker.mask({"type": "response.function_call_arguments.done", **where,
                        "arguments": '{"to": "jane.doe@example.com"}'})
    deltas = "".join(e["delta"] for e in out if e["type"].endswith(".delta"))
    assert out[-1]["arguments"] == '{"to": "<EMAIL>"}' == deltas


class _Message:
    def __init__(self, content: bytes, injected: bool = False) -> None:
        self.content, self.injected, self.from_client, self.dropped = content, injected, False, False


class _Flow:
    def __init__(self) -> None:
        self.metadata: dict = {}
        self.websocket = type("W", (), {"messages": []})()

    def receive(self, content: bytes, injected: bool = False) -> _Message:
        self.websocket.messages.append(_Message(content, injected))
        return self.websocket.messages[-1]


def test_the_session_knows_what_a_message_stands_for_and_which_resent_events_are_on_their_way():
    from auditgate.websocket import session

    flow = _Flow()
    flow.receive(b"done")
    assert session.latest_events(flow) == [b"done"] and session.expansion(flow) is None
    session.set_events(flow, [b"tail", b"done'"])
    assert session.latest_events(flow) == [b"tail", b"done'"] and flow.websocket.messages[-1].content == b"done'"
    assert session.take_expansion(flow) == [b"tail", b"done'"] and "expand" not in session.record(flow)
    # The same event twice on its way is recognised twice; the count of events in flight follows.
    for content in (b"tail", b"same", b"same"):
        session.note_own(flow, content, session.RESENT)
    assert session.record(flow)["in_flight"] == 3
    flow.receive(b"same")  # from the upstream, not injected: not the gateway's own
    assert session.own_kind(flow) is None and session.record(flow)["in_flight"] == 3
    for content in (b"tail", b"same", b"same"):
        flow.receive(content, injected=True)
        assert session.own_kind(flow) == session.RESENT and session.own_kind(flow) == session.RESENT  # once
    assert session.record(flow)["in_flight"] == 0 and session.record(flow)["own"] == {}
    flow.receive(b"same", injected=True)  # a fourth copy was never sent by the gateway
    assert session.own_kind(flow) is None
    # An expansion belongs to the message it was made for only.
    session.set_events(flow, [])
    flow.receive(b"next")
    assert session.expansion(flow) is None and session.latest_events(flow) == [b"next"]


def test_a_server_events_type_that_is_not_dotted_words_is_masked_and_known_types_are_not():
    masker = _masker()
    [renamed] = masker.mask({"type": "note.jane.doe@example.com", "text": "x"})
    assert "jane.doe@example.com" not in renamed["type"] and masker.findings["EMAIL_ADDRESS"] == 1
    known = {"type": "response.output_text.done", "item_id": "m", "output_index": 0, "content_index": 0,
             "text": "hi"}
    assert masker.mask(dict(known)) == [known]
