"""End to end over HTTP: policy reads every carrier of prompt text, or refuses what it cannot read.

The real openai SDK through a real mitmdump with the shipped rules: a secret in a JSON object key (a tool
schema's property name, a metadata key), in an inline text file (data URL or raw base64, Responses or
Chat), in a long base64-looking text, or spelled with a zero-width space, full-width letters or
percent-escapes is blocked; a body with a duplicate key is refused 400; inline content the gateway
cannot read (a PDF, a file by URL) is refused 415 unless policy.yaml allows it; images pass unread.
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import openai
import pytest

from auditgate.identity.service_tokens import add_service_token
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GatewayProcess
from tests.records import wait_for_flows

pytestmark = pytest.mark.e2e

PRIVATE_KEY = ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7carriers\n"
               "-----END PRIVATE KEY-----")
SECRET = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7carriers"
AWS_KEY_ID = "AKIAIOSFODNN7CARRIER"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" + bytes(range(128, 256)) + b"\n%%EOF\n"


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, confdir, upstream_server):
    root = tmp_path_factory.mktemp("policy-carriers")
    rules = make_rules(root / "rules", upstreams=[])
    gw = GatewayProcess(root / "gw", rules=rules, records=root / "records", confdir=confdir, env=gateway_env(),
                        args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}",
                              "--set", "approval_admin_listen=127.0.0.1:0"]).start()
    gw.token = add_service_token(rules, "alice", ["agents"])
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.token, max_retries=0)


def _file_part(file_data: str, filename: str) -> dict:
    return {"role": "user", "content": [{"type": "input_text", "text": "summarize the file"},
                                        {"type": "input_file", "filename": filename, "file_data": file_data}]}


def _schema_with_property(name: str) -> dict:
    return {"type": "object", "properties": {name: {"type": "string"}}, "required": [name]}


# Each: (how the SDK sends it, the secret that must never reach the upstream).
BLOCKED = {
    "a responses tool schema's property name": (lambda c: c.responses.create(
        model="gpt-test", input="hi", tools=[{"type": "function", "name": "lookup", "parameters":
                                              _schema_with_property(PRIVATE_KEY)}]), SECRET),
    "a chat tool schema's property name": (lambda c: c.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {
            "name": "lookup", "parameters": _schema_with_property(AWS_KEY_ID)}}]), AWS_KEY_ID),
    "a metadata key": (lambda c: c.responses.create(model="gpt-test", input="hi", metadata={AWS_KEY_ID: "x"}),
                       AWS_KEY_ID),
    "an inline text file as a data URL": (lambda c: c.responses.create(model="gpt-test", input=[
        _file_part("data:text/plain;base64," + b64(PRIVATE_KEY), "notes.txt")]), SECRET),
    "an inline text file as raw base64": (lambda c: c.responses.create(model="gpt-test", input=[
        _file_part(b64("config:\n  key: " + AWS_KEY_ID + "\n"), "config.yaml")]), AWS_KEY_ID),
    "a chat file part": (lambda c: c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": [
        {"type": "text", "text": "read this"},
        {"type": "file", "file": {"filename": "k.md", "file_data": "data:text/markdown;base64," + b64(PRIVATE_KEY)}}]}]),
        SECRET),
    "an aws key id inside a base64-looking text": (lambda c: c.responses.create(
        model="gpt-test", input="A" * 1100 + "\n" + AWS_KEY_ID + "\n"), AWS_KEY_ID),
    "a zero-width space in the pem header": (lambda c: c.responses.create(
        model="gpt-test", input=PRIVATE_KEY.replace("PRIVATE KEY", "PRIVATE\u200b KEY")), SECRET),
    "full-width letters": (lambda c: c.responses.create(
        model="gpt-test", input="key " + "".join(chr(ord(ch) + 0xFEE0) for ch in AWS_KEY_ID)), "IOSFODNN7"),
    "percent-escaped dashes": (lambda c: c.responses.create(
        model="gpt-test", input=PRIVATE_KEY.replace("-----", "%2D%2D%2D%2D%2D")), SECRET),
    "a duplicate key inside tool-call arguments": (lambda c: c.responses.create(model="gpt-test", input=[
        {"type": "function_call", "call_id": "c1", "name": "lookup",
         "arguments": '{"q": ' + json.dumps(PRIVATE_KEY) + ', "q": "fine"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}]), SECRET),
}


@pytest.mark.parametrize("carrier", list(BLOCKED))
def test_a_secret_in_any_carrier_is_blocked_before_the_upstream(client, upstream, carrier):
    send, secret = BLOCKED[carrier]
    with pytest.raises(openai.PermissionDeniedError) as info:
        send(client)
    assert info.value.code == "gateway_blocked"
    assert "block-private-keys" in info.value.message or "block-cloud-api-keys" in info.value.message
    assert upstream.received == [], f"{secret} reached the upstream"


def _raw_post(gateway, body: bytes) -> httpx.Response:
    # The SDK cannot send a duplicate key (it serializes dicts); a hand-made client can.
    return httpx.post(f"{gateway.url}/v1/responses", content=body, timeout=30,
                      headers={"authorization": f"Bearer {gateway.token}", "content-type": "application/json"})


@pytest.mark.parametrize("body", [
    '{"model":"gpt-test","input":' + json.dumps(PRIVATE_KEY) + ',"input":"hello"}',
    '{"model":"gpt-test","input":[{"role":"user","content":"hi","content":' + json.dumps(PRIVATE_KEY) + '}]}',
    '{"model":"gpt-test","input":"hello","metadata":{"a":"1","a":"2"}}',  # harmless values: refused all the same
], ids=["top level", "nested", "harmless"])
def test_a_body_with_a_duplicate_key_is_refused_400_and_recorded(gateway, upstream, body):
    marker = f"dup-{time.monotonic_ns()}"
    response = _raw_post(gateway, body.replace('"model":"gpt-test"', f'"model":"{marker}"').encode())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "gateway_bad_request" and "same key twice" in error["message"]
    assert upstream.received == []
    [flow] = wait_for_flows(gateway.records, lambda f: marker.encode() in (f.request.raw_content or b""))
    assert flow.response.status_code == 400
    assert flow.metadata["auditgate.policy"]["rule"] == "undecodable-body"


UNREADABLE = {
    "a pdf as a data URL": lambda c: c.responses.create(model="gpt-test", input=[
        _file_part("data:application/pdf;base64," + b64(PDF), "report.pdf")]),
    "a pdf as raw base64": lambda c: c.responses.create(model="gpt-test", input=[_file_part(b64(PDF), "report.pdf")]),
    "a text type with a pdf inside": lambda c: c.responses.create(model="gpt-test", input=[
        _file_part("data:text/plain;base64," + b64(PDF), "report.txt")]),
    "base64 that does not decode": lambda c: c.responses.create(model="gpt-test", input=[
        _file_part("data:text/plain;base64,LS0t!!LS1CRUdJTiBQUklW", "notes.txt")]),
    "a file by URL": lambda c: c.responses.create(model="gpt-test", input=[{"role": "user", "content": [
        {"type": "input_file", "file_url": "https://files.example/report.pdf"}]}]),
    "a chat pdf file part": lambda c: c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64," + b64(PDF)}}]}]),
}


@pytest.mark.parametrize("carrier", list(UNREADABLE))
def test_content_the_gateway_cannot_read_is_refused_415(client, upstream, carrier):
    with pytest.raises(openai.APIStatusError) as info:
        UNREADABLE[carrier](client)
    assert info.value.status_code == 415 and info.value.code == "gateway_content_unreadable"
    assert "cannot read" in info.value.message and "unreadable_content: allow" in info.value.message
    assert upstream.received == []


def test_images_pass_unread_and_a_readable_file_passes_read(client, upstream):
    png = "data:image/png;base64," + b64(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    assert client.responses.create(model="gpt-test", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": png}]}]).output_text
    assert client.responses.create(model="gpt-test", input=[
        _file_part("data:text/csv;base64," + b64("city,temp\nParis,21\n"), "weather.csv")]).output_text
    sent = [r.json()["input"][0]["content"][1] for r in upstream.received]
    assert sent[0]["image_url"] == png and sent[1]["file_data"].endswith(b64("city,temp\nParis,21\n"))


def test_unreadable_content_allowed_by_policy_passes_and_is_recorded_unread(gateway, client, upstream):
    path = gateway.rules / "policy.yaml"
    shipped = path.read_text()
    send = UNREADABLE["a pdf as a data URL"]

    def until(passes: bool) -> None:
        deadline = time.monotonic() + 15
        while True:
            try:
                send(client)
                outcome = True
            except openai.APIStatusError as e:
                assert e.code == "gateway_content_unreadable"
                outcome = False
            if outcome == passes:
                return
            assert time.monotonic() < deadline, "the policy edit was not picked up"
            time.sleep(0.1)

    try:
        path.write_text(shipped.replace("unreadable_content: refuse", "unreadable_content: allow"))
        until(passes=True)
        assert upstream.received and upstream.received[-1].json()["input"][0]["content"][1]["filename"] == "report.pdf"
        [flow, *_] = wait_for_flows(gateway.records, lambda f: (f.metadata.get("auditgate.policy") or {}).get("unread"))
        assert flow.metadata["auditgate.policy"]["unread"] == ["application/pdf"]
    finally:
        path.write_text(shipped)
    until(passes=False)
