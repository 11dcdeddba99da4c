"""End to end: the real Agents SDK Runner (run and run_streamed, Responses and Chat Completions, a tool
round trip) through a real mitmdump running the bundle, in reverse and forward mode."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.agent_app import run_agent, run_agent_streamed
from tests.conftest import UPSTREAM_KEY

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


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_forward_runner_run_streamed(forward_env, tls_upstream, callers, api):
    tls_upstream.reply_text = "It is lovely."
    final, deltas = asyncio.run(run_agent_streamed(api))
    assert final == EXPECTED
    _check_round_trip(tls_upstream, callers.alice, api)
