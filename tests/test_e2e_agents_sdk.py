"""End to end: the real Agents SDK Runner (run and run_streamed, Responses and Chat Completions, a tool
round trip) through a real mitmdump running the bundle, in reverse and forward mode."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from agents import Runner

from tests.agent_app import RUN_CONFIG, build_agent, run_agent, run_agent_streamed
from tests.conftest import UPSTREAM_KEY
from tests.honesty_streaming import record_upstream_streams, warm_up_agents_streaming
from tests.masking_fixtures import PII_VALUES

pytestmark = pytest.mark.e2e

EXPECTED = "It is lovely. Tool said: sunny in Paris"


def _check_round_trip(fake, token: str, api: str) -> None:
    paths = [r.path for r in fake.received]
    suffix = "/responses" if api == "responses" else "/chat/completions"
    assert len(paths) == 2 and all(p.endswith(suffix) for p in paths), paths
    first, second = (r.json() for r in fake.received)
    assert [t.get("name") or t["function"]["name"] for t in first["tools"]] == ["get_weather"]
    # The tool's result went back to the model in the second request.
    assert "sunny in Paris" in json.dumps(second)
    for request in fake.received:
        assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert token not in json.dumps(request.headers) and token.encode() not in request.body


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_reverse_runner_run(reverse_env, upstream, callers, api):
    upstream.reply_text = "It is lovely."
    assert asyncio.run(run_agent(api)) == EXPECTED
    _check_round_trip(upstream, callers.alice, api)


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_reverse_runner_run_streamed(reverse_env, upstream, callers, api):
    upstream.reply_text = "It is lovely."
    final, deltas = asyncio.run(run_agent_streamed(api))
    assert final == EXPECTED
    if api == "responses":
        assert "".join(deltas) == EXPECTED and len(deltas) > 1
    _check_round_trip(upstream, callers.alice, api)


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_forward_runner_run(forward_env, tls_upstream, callers, api):
    tls_upstream.reply_text = "It is lovely."
    assert asyncio.run(run_agent(api)) == EXPECTED
    _check_round_trip(tls_upstream, callers.alice, api)


async def _run_streamed_timed(api: str) -> tuple[str, list[tuple[float, str]], float]:
    """run_agent_streamed, noting when each text delta and the final response's completion event arrived."""
    result = Runner.run_streamed(build_agent(api), "What is the weather in Paris?", run_config=RUN_CONFIG)
    deltas, completed = [], []
    async for event in result.stream_events():
        if event.type == "raw_response_event":
            kind = getattr(event.data, "type", "")
            if kind == "response.output_text.delta":
                deltas.append((time.monotonic(), event.data.delta))
            elif kind == "response.completed":
                completed.append(time.monotonic())
    return str(result.final_output), deltas, completed[-1]


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_forward_runner_run_streamed(forward_env, tls_upstream, callers, api, monkeypatch):
    tls_upstream.reply_text = f"It is lovely. Mail {PII_VALUES['EMAIL_ADDRESS']} for more."
    tls_upstream.deltas, tls_upstream.event_delay = 10, 0.05  # the answer's stream lasts 0.6-0.9 s upstream
    warm_up_agents_streaming(api)  # the SDKs' first parse of a stream costs ~1 s of client time
    sent = record_upstream_streams(monkeypatch)
    final, deltas, completed = asyncio.run(_run_streamed_timed(api))
    assert final == "It is lovely. Mail <EMAIL_ADDRESS> for more. Tool said: sunny in Paris"
    assert "".join(d for _, d in deltas) == final  # streamed, masked, nothing raw
    _check_round_trip(tls_upstream, callers.alice, api)
    # The answer (the second model call) reached the agent delta by delta while the upstream was still
    # sending it through the forward-mode gateway, not in one piece at the end.
    assert len(sent) == 2
    answer, first = sent[1], deltas[0][0]
    assert answer.started < first < answer.finished - 0.25, (
        f"first delta {first - answer.started:.2f} s after the upstream began sending, "
        f"{answer.finished - first:.2f} s before it finished")
    assert first < completed - 0.25
    assert len({round(t, 1) for t, _ in deltas}) >= 3
