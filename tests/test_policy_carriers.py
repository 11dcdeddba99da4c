"""Unit: what policy reads of a request (keys, inline files, base64 runs, normalized text) and what it refuses."""

from __future__ import annotations

import base64
import json

import pytest

from auditgate.core.config import ConfigError
from auditgate.core.inline_content import read_data_url, read_file_data
from auditgate.core.prompt_text import PromptTexts
from auditgate.core.request_facts import RequestFacts, prompt_texts
from auditgate.core.shipped import SHIPPED_RULES
from auditgate.core.strict_json import DuplicateKeyError, loads_strict
from auditgate.masking.payload import (
    is_encoded_blob,
    mask_request_payload,
    read_request_texts,
)
from auditgate.policy.loading import match_input
from auditgate.policy.rules import MatchInput, load_policy, parse_policy

PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
AWS_KEY_ID = "AKIAIOSFODNN7UNITTST"
PDF = b"%PDF-1.7\n" + bytes(range(256))


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@pytest.fixture(scope="module")
def shipped():
    return load_policy(SHIPPED_RULES / "policy.yaml")


def decide(policy, payload):
    texts = prompt_texts(payload)
    return policy.decide(MatchInput(texts_fn=lambda: texts))


# ---- 1. object keys -----------------------------------------------------------------------------------
def test_caller_chosen_keys_are_read_and_the_apis_own_are_not():
    payload = {"model": "m", "input": "hi", "metadata": {"ticket": "1"},
               "tools": [{"type": "function", "name": "f", "parameters": {
                   "type": "object", "properties": {"customer_email": {"type": "string", "description": "d"}},
                   "required": ["customer_email"], "additionalProperties": False}}]}
    texts = read_request_texts(payload)
    assert texts.keys == ("ticket", "customer_email")
    assert list(texts) == ["hi", "1", "d", "customer_email", "ticket\ncustomer_email"]


def test_keys_inside_tool_call_arguments_are_read(shipped):
    payload = {"input": [{"type": "function_call", "call_id": "c", "name": "f",
                          "arguments": json.dumps({PRIVATE_KEY: 1})}]}
    assert PRIVATE_KEY in read_request_texts(payload).keys
    assert decide(shipped, payload).rule == "block-private-keys"


def test_masking_does_not_rewrite_keys_and_sees_no_key_as_text():
    seen = []
    masked = mask_request_payload({"metadata": {"jane@example.org": "x"}}, "responses",
                                  lambda text, path: seen.append(text) or text.upper())
    assert masked == {"metadata": {"jane@example.org": "X"}} and seen == ["x"]


# ---- 2. duplicate keys ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ['{"a":1,"a":2}', '{"x":[{"b":{"c":1,"c":1}}]}', b'{"type":"t","type":"u"}'])
def test_loads_strict_refuses_a_duplicate_key_at_any_depth(text):
    with pytest.raises(DuplicateKeyError):
        loads_strict(text)
    assert isinstance(DuplicateKeyError(), ValueError)  # every caller's ValueError path refuses it too


def test_loads_strict_reads_what_json_loads_reads():
    text = '{"a":[1,{"b":"\\u00e9"}],"c":{"a":null}}'
    assert loads_strict(text) == json.loads(text)


class _Request:
    def __init__(self, body: bytes) -> None:
        self.raw_content, self.method, self.path = body, "POST", "/v1/responses"
        self.headers = {"content-type": "application/json"}

    def get_content(self, strict: bool = True) -> bytes:
        return self.raw_content


def test_a_request_body_with_a_duplicate_key_cannot_be_read():
    facts = RequestFacts(_Request(b'{"model":"m","input":"a","input":"b"}'))
    assert facts.payload is None
    error = facts.decode_error
    assert (error.status, error.code) == (400, "gateway_bad_request") and "same key twice" in error.message


def test_tool_call_arguments_with_a_duplicate_key_are_read_whole(shipped):
    arguments = '{"q": ' + json.dumps(PRIVATE_KEY) + ', "q": "fine"}'
    payload = {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": arguments}]}
    assert arguments in read_request_texts(payload)
    assert decide(shipped, payload).rule == "block-private-keys"


# ---- 3. inline files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, filename, kind, media", [
    ("data:text/plain;base64," + b64("hello"), None, "text", "text/plain"),
    ("data:application/json;base64," + b64('{"a":1}'), "a.json", "text", "application/json"),
    (b64("a,b\n1,2\n"), "t.csv", "text", "unknown"),  # raw base64: its filename says text
    (b64("# notes"), None, "text", "unknown"),
    ("data:text/plain;base64," + b64("\ufeffbom"), None, "text", "text/plain"),
    ("data:text/plain;base64," + b64("utf16".encode("utf-16")), None, "text", "text/plain"),
    ("data:text/plain,%2D%2D%2Dplain", None, "text", "text/plain"),
    ("data:application/pdf;base64," + b64(PDF), "r.pdf", "unreadable", "application/pdf"),
    (b64(PDF), "r.pdf", "unreadable", "application/pdf"),
    ("data:text/plain;base64," + b64(PDF), None, "unreadable", "text/plain"),  # a PDF whatever it is called
    ("data:text/plain;base64," + b64("text"), "r.docx", "unreadable",  # its name says office
     "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    ("data:text/plain;base64," + b64(b"\xff\xfe\x00bin\x80"[3:]), None, "unreadable", "text/plain"),
    ("data:text/plain;base64," + b64("a\x00b"), None, "unreadable", "text/plain"),
    ("data:text/plain;base64,LS0t!!LS0t", None, "unreadable", "text/plain"),
    ("not base64 at all!", "a.txt", "unreadable", "unknown"),
    ("data:image/png;base64," + "A" * 100, None, "media", "image/png"),
    ("data:image/svg+xml;base64," + b64("<svg>" + AWS_KEY_ID + "</svg>"), None, "text", "image/svg+xml"),
    (b64(b"\x89PNG"), "photo.png", "media", "image/png"),
])
def test_inline_file_data_is_read_as_text_noted_as_media_or_unreadable(value, filename, kind, media):
    content = read_file_data(value, filename)
    assert (content.kind, content.media_type) == (kind, media)


def test_a_record_never_holds_a_media_type_the_caller_made_up():
    assert read_data_url("data:jane doe@example.org;base64," + b64("x")).media_type == "unknown"


def test_inline_files_are_read_and_unreadable_ones_refused(shipped):
    text_file = {"input": [{"role": "user", "content": [
        {"type": "input_file", "filename": "k.txt", "file_data": "data:text/plain;base64," + b64(PRIVATE_KEY)}]}]}
    assert decide(shipped, text_file).rule == "block-private-keys"
    chat_file = {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "k.md", "file_data": b64("key " + AWS_KEY_ID)}}]}]}
    assert decide(shipped, chat_file).rule == "block-cloud-api-keys"
    pdf = {"input": [{"role": "user", "content": [
        {"type": "input_file", "filename": "r.pdf", "file_data": "data:application/pdf;base64," + b64(PDF)}]}]}
    decision = decide(shipped, pdf)
    assert (decision.action, decision.rule, decision.refusal) == ("block", "unreadable-content",
                                                                  (415, "gateway_content_unreadable"))
    assert decision.matched == {"unreadable": ["application/pdf"]} and "unreadable_content: allow" in decision.message
    by_url = {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/r.pdf"}]}]}
    assert decide(shipped, by_url).rule == "unreadable-content"


def test_images_and_audio_pass_unread(shipped):
    payload = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(bytes(range(256)) * 8)}},
        {"type": "input_audio", "input_audio": {"data": b64(bytes(range(256)) * 8), "format": "wav"}}]}]}
    texts = read_request_texts(payload)
    assert list(texts) == [] and texts.media == ("image/jpeg", "audio") and texts.unreadable == ()
    assert decide(shipped, payload).action == "allow"


def test_unreadable_content_is_a_top_level_setting_refuse_by_default():
    assert parse_policy("rules: []\n").unreadable_content == "refuse"
    assert load_policy(SHIPPED_RULES / "policy.yaml").unreadable_content == "refuse"
    allowing = parse_policy("unreadable_content: allow\nrules: []\n")
    pdf = {"input": [{"type": "input_file", "file_data": "data:application/pdf;base64," + b64(PDF)}]}
    decision = decide(allowing, pdf)
    assert decision.action == "allow" and decision.as_metadata()["unread"] == ["application/pdf"]
    with pytest.raises(ConfigError) as info:
        parse_policy("rules: []\nunreadable_content: maybe\n")
    assert ":2:" in str(info.value) and "refuse, allow" in str(info.value)


# ---- 4. long base64-looking texts ------------------------------------------------------------------------
def test_policy_reads_long_base64_runs_and_masking_skips_only_real_payloads(shipped):
    hidden = "A" * 1100 + "\n" + AWS_KEY_ID + "\n"
    assert decide(shipped, {"input": hidden}).rule == "block-cloud-api-keys"
    assert decide(shipped, {"input": "A" * 2000 + AWS_KEY_ID}).rule == "block-cloud-api-keys"
    assert not is_encoded_blob(hidden)  # line breaks: text, masked like text
    cards = "4111111111111111\n" * 80  # a list of card numbers, one per line: text, not a payload
    assert not is_encoded_blob(cards)
    seen = []
    mask_request_payload({"input": cards}, "responses", lambda text, path: seen.append(text) or text)
    assert seen == [cards]
    payload = b64(bytes(range(256)) * 8)
    assert is_encoded_blob(payload) and is_encoded_blob("data:image/png;base64," + payload)
    seen.clear()
    mask_request_payload({"input": payload}, "responses", lambda text, path: seen.append(text) or text)
    assert seen == []  # masking still skips real payloads (cost); policy read it above


# ---- 5. normalized text --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [
    PRIVATE_KEY.replace("PRIVATE KEY", "PRIVATE\u200b KEY"),
    PRIVATE_KEY.replace("-----", "%2D%2D%2D%2D%2D"),
    PRIVATE_KEY.replace("-----", "&#45;&#45;&#45;&#45;&#45;"),
    PRIVATE_KEY.replace("BEGIN", "\uff22\uff25\uff27\uff29\uff2e"),  # full-width letters
    PRIVATE_KEY.replace("PRIVATE", "PRI\u00adVATE"),  # a soft hyphen
])
def test_a_rule_matches_the_normalized_text_too(shipped, spelling):
    assert decide(shipped, {"input": spelling}).rule == "block-private-keys"


def test_keywords_match_normalized_text_and_raw_text_still_matches():
    policy = parse_policy("rules:\n  - id: k\n    match: {text: {keywords: [ignore previous instructions]}}\n"
                          "    action: block\n")
    assert decide(policy, {"input": "please IGNORE\u200b previous\u00a0instructions"}).rule == "k"
    assert decide(policy, {"input": "ignore previous instructions"}).rule == "k"
    assert decide(policy, {"input": "ignore the previous instructions"}).action == "allow"


def test_the_text_is_normalized_once_and_plain_text_is_not_copied():
    texts = PromptTexts(["plain ascii prose", "more"])
    assert texts.normalized is texts.joined  # nothing to fold: the raw text is matched once only
    odd = PromptTexts(["a\u200bb"])
    assert odd.normalized == "ab" and odd.normalized is odd.normalized
    facts = RequestFacts(_Request(b'{"input":"x"}'))
    assert facts.prompt_texts is facts.prompt_texts  # parse once per flow: the facts keep it


# ---- the same carriers in a WebSocket client event ---------------------------------------------------------------
@pytest.mark.parametrize("event, rule", [
    ({"type": "response.create", "tools": [{"type": "function", "name": "f", "parameters": {
        "type": "object", "properties": {PRIVATE_KEY: {"type": "string"}}}}]}, "block-private-keys"),
    ({"type": "x.custom", "payload": {AWS_KEY_ID: 1}}, "block-cloud-api-keys"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_file", "filename": "k.txt", "file_data": b64(PRIVATE_KEY)}]}}, "block-private-keys"),
    ({"type": "response.create", "input": [{"role": "user", "content": [
        {"type": "input_file", "file_data": "data:application/pdf;base64," + b64(PDF)}]}]}, "unreadable-content"),
    ({"type": "x.custom", "file_data": "data:application/pdf;base64," + b64(PDF)}, "unreadable-content"),
    ({"type": "response.create", "input": "A" * 1100 + "\n" + AWS_KEY_ID + "\n"}, "block-cloud-api-keys"),
    ({"type": "response.create", "instructions": PRIVATE_KEY.replace("KEY", "K\u200bEY")}, "block-private-keys"),
])
def test_a_websocket_client_event_is_read_the_same_way(shipped, event, rule):
    from auditgate.websocket.facts import EventFacts

    facts = EventFacts(event, endpoint="responses", path="/v1/responses", method="GET", size=1)
    assert facts.prompt_texts  # decided, even an unknown event type whose only text is a key or a file
    assert shipped.decide(match_input(facts, {}, {}, "h", 443)).rule == rule


def test_the_websocket_duplicate_key_message_is_refused_by_the_strict_parse():
    # auditgate.websocket.events.parse must use loads_strict: its ValueError becomes NotAnEvent (400-style error).
    with pytest.raises(ValueError):
        loads_strict(('{"type":"response.create","input":' + json.dumps(PRIVATE_KEY) + ',"input":"hello"}').encode())
