"""When the fake upstream sent each streamed reply, to compare with when its events reached the client."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import openai

from tests.fake_openai import FakeOpenAI, _Handler


@dataclass
class Sent:
    path: str
    started: float  # time.monotonic() when the upstream began sending the stream
    finished: float | None = None  # when it had written the stream's last byte (None: still sending)


def record_upstream_streams(monkeypatch) -> list[Sent]:
    """Every SSE reply either fake upstream sends during the test, in order (same clock as time.monotonic())."""
    sent: list[Sent] = []
    original = _Handler._send_sse

    def send_sse(handler, events):
        entry = Sent(handler.path, time.monotonic())
        sent.append(entry)
        original(handler, events)
        entry.finished = time.monotonic()

    monkeypatch.setattr(_Handler, "_send_sse", send_sse)
    return sent


def _in_memory_upstream(fake: FakeOpenAI) -> httpx.MockTransport:
    """The fake upstream's replies, served to a client without a socket (same bytes as its HTTP server)."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        path = request.url.path.rstrip("/")
        if not body.get("stream"):
            payload = fake.responses_json(body) if path.endswith("/responses") else fake.chat_json(body)
            return httpx.Response(200, json=payload)
        events = (fake.responses_events(body) if path.endswith("/responses")
                  else [*((None, c) for c in fake.chat_chunks(body)), (None, "[DONE]")])
        data = b"".join(((f"event: {name}\n" if name else "")
                         + f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n").encode() for name, p in events)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data)

    return httpx.MockTransport(handle)


def warm_up_openai_streaming() -> None:
    """Parse one Responses stream with the openai SDK, in memory.

    The SDK builds its event models on first use: the first stream a process parses takes about a
    second longer than its bytes take to arrive, which would look like a gateway that buffers.
    """
    client = openai.OpenAI(base_url="http://sdk-warm-up.invalid/v1", api_key="warm-up",
                           http_client=httpx.Client(transport=_in_memory_upstream(FakeOpenAI())))
    with client.responses.stream(model="gpt-test", input="warm up") as stream:
        for _ in stream:
            pass


def warm_up_agents_streaming(api: str) -> None:
    """Run one streamed Agents SDK tool round trip in memory (the same parsing as the run under test)."""
    from agents import Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner

    from tests.agent_app import RUN_CONFIG, get_weather

    client = openai.AsyncOpenAI(base_url="http://sdk-warm-up.invalid/v1", api_key="warm-up",
                                http_client=httpx.AsyncClient(transport=_in_memory_upstream(FakeOpenAI())))
    model = (OpenAIResponsesModel(model="gpt-test", openai_client=client) if api == "responses"
             else OpenAIChatCompletionsModel(model="gpt-test", openai_client=client))
    agent = Agent(name="warm-up", instructions="Use the tool.", model=model, tools=[get_weather])

    async def run() -> None:
        result = Runner.run_streamed(agent, "warm up", run_config=RUN_CONFIG)
        async for _ in result.stream_events():
            pass

    asyncio.run(run())
