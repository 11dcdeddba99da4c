"""End to end: PII masking through a real mitmdump with the real openai SDK and Agents SDK."""

from __future__ import annotations

import asyncio
import secrets
import string
import threading
import time

import httpx
import openai
import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
)
from openai import AsyncOpenAI

from tests.agent_app import RUN_CONFIG, run_agent, run_agent_streamed
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GatewayProcess
from tests.honesty_streaming import record_upstream_streams, warm_up_openai_streaming
from tests.masking_fixtures import MASKED_SENTENCE, PII_SENTENCE, PII_VALUES
from tests.records import files_containing, wait_for_flows

pytestmark = pytest.mark.e2e

RAW_VALUES = list(PII_VALUES.values())


def _no_raw_pii(text: str) -> None:
    assert not [v for v in RAW_VALUES if v in text], text


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_runner_run_gets_masked_text(reverse_env, upstream, api):
    upstream.reply_text = PII_SENTENCE
    output = asyncio.run(run_agent(api))
    assert output == f"{MASKED_SENTENCE} Tool said: sunny in Paris"


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_runner_run_streamed_gets_masked_text(reverse_env, upstream, api):
    upstream.reply_text = PII_SENTENCE
    upstream.deltas = 40
    final, deltas = asyncio.run(run_agent_streamed(api))
    assert final == f"{MASKED_SENTENCE} Tool said: sunny in Paris"
    assert "".join(deltas) == final
    _no_raw_pii("".join(deltas))


def test_forward_mode_stream_is_masked(forward_env, tls_upstream):
    tls_upstream.reply_text = PII_SENTENCE
    final, deltas = asyncio.run(run_agent_streamed("responses"))
    assert final == f"{MASKED_SENTENCE} Tool said: sunny in Paris" == "".join(deltas)


def test_tool_call_arguments_arrive_masked_and_parse(reverse_env, upstream):
    seen: list[dict] = []

    @function_tool
    def send_invoice(email: str, iban: str) -> str:
        """Send an invoice."""
        seen.append({"email": email, "iban": iban})
        return "sent"

    upstream.tool_arguments = {"email": PII_VALUES["EMAIL_ADDRESS"], "iban": PII_VALUES["IBAN_CODE"]}
    upstream.reply_text = "Done."
    for model in (OpenAIResponsesModel("gpt-test", AsyncOpenAI()), OpenAIChatCompletionsModel("gpt-test", AsyncOpenAI())):
        agent = Agent(name="billing", instructions="Use the tool.", model=model, tools=[send_invoice])
        result = asyncio.run(Runner.run(agent, "Invoice the customer", run_config=RUN_CONFIG))
        assert result.final_output == "Done. Tool said: sent"
    assert seen == [{"email": "<EMAIL_ADDRESS>", "iban": "<IBAN_CODE>"}] * 2


def test_plain_sdk_json_reply_masked_and_recorded_masked(reverse_env, upstream, records_root):
    upstream.reply_text = PII_SENTENCE
    client = openai.OpenAI()
    raw = client.responses.with_raw_response.create(model="gpt-test", input="marker-json-masking")
    assert raw.parse().output_text == MASKED_SENTENCE
    chat = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == MASKED_SENTENCE
    [flow] = wait_for_flows(records_root / "reverse", lambda f: b"marker-json-masking" in (f.request.content or b""))
    masking = flow.metadata["auditgate.masking"]
    assert masking["status"] == "masked"
    assert sorted(f["entity_type"] for f in masking["findings"]) == sorted(PII_VALUES)
    assert {f["direction"] for f in masking["findings"]} == {"response"}
    assert all(f["path"] == "output[0].content[0].text" and f["count"] == 1 for f in masking["findings"])
    assert flow.comment.startswith("masked 7: ")
    _no_raw_pii(flow.response.get_text())


def test_gzip_reply_from_an_upstream_that_ignores_accept_encoding(reverse_env, upstream):
    upstream.reply_text, upstream.json_encoding = PII_SENTENCE, "gzip"
    assert openai.OpenAI().responses.create(model="gpt-test", input="hi").output_text == MASKED_SENTENCE
    # The gateway asked the upstream for plain bytes.
    assert upstream.received[-1].headers["accept-encoding"] == "identity"


def test_gzip_stream_still_streams_and_is_masked(reverse_env, upstream, monkeypatch):
    upstream.reply_text, upstream.stream_encoding = PII_SENTENCE, "gzip"
    upstream.deltas, upstream.event_delay = 10, 0.05  # 18 events, 50 ms apart: the upstream sends for ~0.85 s
    warm_up_openai_streaming()  # so the client parses each event as it arrives, even in a fresh process
    sent = record_upstream_streams(monkeypatch)
    client = openai.OpenAI()
    arrivals = []  # (time.monotonic(), event) as the client iterates
    with client.responses.stream(model="gpt-test", input="hi") as stream:
        for event in stream:
            arrivals.append((time.monotonic(), event))
    deltas = [(t, e.delta) for t, e in arrivals if e.type == "response.output_text.delta"]
    assert "".join(d for _, d in deltas) == MASKED_SENTENCE
    _no_raw_pii("".join(d for _, d in deltas))
    [upstream_stream] = sent
    completed = next(t for t, e in arrivals if e.type == "response.completed")
    first = deltas[0][0]
    # Masked text reached the client while the upstream was still sending (the rest of the stream takes
    # ~0.6 s after the first delta): the gateway did not collect the whole reply before releasing any of it.
    assert first < upstream_stream.finished - 0.25, (
        f"first delta {first - upstream_stream.started:.2f} s after the upstream began sending, "
        f"{upstream_stream.finished - first:.2f} s before it finished")
    assert first < completed - 0.25
    assert len({round(t, 1) for t, _ in deltas}) >= 3  # spread over time, not one burst


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_stream_that_cannot_be_masked_ends_with_an_error(reverse_env, upstream, api):
    upstream.reply_text, upstream.stream_encoding = PII_SENTENCE, "x-unknown-coding"
    client = openai.OpenAI(max_retries=0)
    received = []
    with pytest.raises(openai.APIError) as info:
        if api == "responses":
            stream = client.responses.create(model="gpt-test", input="hi", stream=True)
        else:
            stream = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                                    stream=True)
        for event in stream:
            received.append(event)
    assert info.value.code == "gateway_masking_failed"
    assert received == []  # not one event of the unmaskable stream was released


def test_embeddings_pass_untouched(reverse_env, upstream):
    # Vectors carry no text to mask: the reply passes byte for byte. (The input holds no personal
    # data: request masking is off on this gateway, so prompts are recorded as sent.)
    result = openai.OpenAI().embeddings.create(model="text-embedding-test", input=["abcdef"])
    assert result.data[0].embedding == pytest.approx([0.6, 0.7, 0.8, 0.9])


def test_trace_uploads_are_masked(reverse_env, upstream, callers):
    body = {"data": [{"object": "trace.span", "span_data": {"input": PII_SENTENCE}}]}
    response = httpx.post(f"{reverse_env.url}/v1/traces/ingest", json=body,
                          headers={"authorization": f"Bearer {callers.alice}"})
    assert response.status_code == 200
    forwarded = upstream.received[-1].json()
    assert forwarded["data"][0]["span_data"]["input"] == MASKED_SENTENCE


@pytest.fixture(scope="module")
def strict_gateway(tmp_path_factory, confdir, upstream_server, callers, rules_and_callers):
    """A gateway that masks requests too, refuses trace uploads and gives masking 0.5 s at most."""
    rules_src, _ = rules_and_callers
    work = tmp_path_factory.mktemp("strict")
    rules = make_rules(work / "rules", upstreams=[])
    (rules / "identities.yaml").write_text((rules_src / "identities.yaml").read_text())
    text = (rules / "masking.yaml").read_text()
    text = text.replace("request:\n  enabled: false", "request:\n  enabled: true")
    text = text.replace("traces: mask", "traces: refuse").replace("timeout_seconds: 5", "timeout_seconds: 0.5")
    (rules / "masking.yaml").write_text(text)
    gateway = GatewayProcess(work / "gw", rules=rules, records=work / "records", confdir=confdir,
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}"],
                             env=gateway_env()).start()
    yield gateway
    gateway.stop()


def test_request_masking_when_enabled(strict_gateway, upstream, callers):
    upstream.reply_text = "ok"
    client = openai.OpenAI(base_url=f"{strict_gateway.url}/v1", api_key=callers.alice)
    client.responses.create(model="gpt-test", instructions=f"Customer: {PII_VALUES['EMAIL_ADDRESS']}", input=PII_SENTENCE,
                            metadata={"test": "request-masking"})
    sent = upstream.received[-1].json()
    assert sent["input"] == MASKED_SENTENCE and sent["instructions"] == "Customer: <EMAIL_ADDRESS>"
    _no_raw_pii(upstream.received[-1].body.decode())
    [flow] = wait_for_flows(strict_gateway.records, lambda f: b"request-masking" in (f.request.content or b""))
    findings = flow.metadata["auditgate.masking"]["findings"]
    assert {f["direction"] for f in findings} == {"request"}
    assert {f["path"] for f in findings} == {"input", "instructions"}


def test_trace_uploads_refused_when_configured(strict_gateway, upstream, callers):
    response = httpx.post(f"{strict_gateway.url}/v1/traces/ingest", json={"data": []},
                          headers={"authorization": f"Bearer {callers.alice}"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "gateway_forbidden"
    assert upstream.received == []


def test_masking_timeout_fails_closed(strict_gateway, upstream, callers):
    # Dense personal data, a few hundred KB: far more than 0.5 s of analysis.
    upstream.reply_text = " ".join([PII_SENTENCE] * 3000)
    client = openai.OpenAI(base_url=f"{strict_gateway.url}/v1", api_key=callers.alice, max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.responses.create(model="gpt-test", input="big-reply-times-out")
    assert info.value.status_code == 502 and info.value.code == "gateway_masking_failed"
    [flow] = wait_for_flows(strict_gateway.records, lambda f: b"big-reply-times-out" in (f.request.content or b""))
    assert flow.metadata["auditgate.masking"]["status"] == "failed"
    assert "timed out" in flow.metadata["auditgate.masking"]["reason"]
    assert flow.response.status_code == 502


def test_slow_masking_does_not_delay_a_concurrent_clean_request(reverse_env, upstream, callers):
    upstream.reply_text = "Hello, nothing personal here."
    upstream.reply_overrides = {"slow-one": " ".join([PII_SENTENCE] * 1500)}
    client = openai.OpenAI(timeout=60)
    finished = {}

    def slow() -> None:
        client.responses.create(model="gpt-test", input="slow-one")
        finished["slow"] = time.monotonic()

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(b"slow-one" in r.body for r in upstream.received) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the slow reply is now being masked
    started = time.monotonic()
    assert client.responses.create(model="gpt-test", input="quick").output_text == "Hello, nothing personal here."
    clean_done = time.monotonic()
    thread.join(60)
    assert "slow" in finished
    assert clean_done < finished["slow"], "the clean request waited for the slow masking job"
    assert clean_done - started < (finished["slow"] - started) / 2


def test_no_raw_pii_in_any_record(reverse_env, upstream, strict_gateway, callers, records_root):
    # Its own traffic first: personal data in JSON, streamed and tool-call replies and in a trace upload
    # (reverse gateway, which masks replies and traces), and in a prompt (the request-masking gateway).
    marker = "piiscan" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(10))
    upstream.reply_text = PII_SENTENCE
    client = openai.OpenAI()
    assert client.responses.create(model="gpt-test", input=f"{marker} json").output_text == MASKED_SENTENCE
    with client.responses.stream(model="gpt-test", input=f"{marker} stream") as stream:
        assert "".join(e.delta for e in stream if e.type == "response.output_text.delta") == MASKED_SENTENCE
    chat = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": f"{marker} chat"}])
    assert chat.choices[0].message.content == MASKED_SENTENCE
    upstream.tool_arguments = {"email": PII_VALUES["EMAIL_ADDRESS"], "iban": PII_VALUES["IBAN_CODE"]}
    call = client.responses.create(model="gpt-test", input=f"{marker} tool",
                                   tools=[{"type": "function", "name": "send_invoice", "parameters": {}}])
    assert call.output[0].arguments == '{"email": "<EMAIL_ADDRESS>", "iban": "<IBAN_CODE>"}'
    trace = httpx.post(f"{reverse_env.url}/v1/traces/ingest", headers={"authorization": f"Bearer {callers.alice}"},
                       json={"data": [{"object": "trace.span", "span_data": {"input": f"{marker} {PII_SENTENCE}"}}]})
    assert trace.status_code == 200
    strict = openai.OpenAI(base_url=f"{strict_gateway.url}/v1", api_key=callers.alice)
    strict.responses.create(model="gpt-test", input=f"{marker} prompt {PII_SENTENCE}")

    def mine(flow) -> bool:
        return marker.encode() in (flow.request.content or b"")

    assert len(wait_for_flows(records_root / "reverse", mine, count=5)) == 5
    assert len(wait_for_flows(strict_gateway.records, mine, count=1)) == 1
    # Every file every gateway of this module wrote (flows, audit log), this test's flows among them.
    for root in (records_root, strict_gateway.records):
        assert files_containing(root, [marker]), root  # the scan reads what this test sent
        assert files_containing(root, RAW_VALUES) == []
