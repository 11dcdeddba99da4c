"""Reverse mode and the Agents SDK's trace uploads: the start-up hint's way keeps them inside the gateway.

The SDK posts its traces to https://api.openai.com/v1/traces/ingest whatever OPENAI_BASE_URL says,
with OPENAI_API_KEY (in reverse mode: the caller's gateway token). A real agent run, in a child
process whose every connection beyond 127.0.0.1 is recorded and refused (``tests/agents_traces_run.py``),
shows it: as shipped, the SDK tries api.openai.com; with its exporter pointed at the gateway, as the
hint says, it reaches no other host and the gateway records the upload.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from auditgate.core.flow_contract import IDENTITY
from tests.gateway_process import ROOT
from tests.records import wait_for_flows

pytestmark = pytest.mark.e2e


def _run_agent(mode: str, workflow: str, gateway_url: str, token: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and k not in ("OPENAI_AGENTS_DISABLE_TRACING", "OPENAI_BASE_URL")}
    env.update(OPENAI_BASE_URL=f"{gateway_url}/v1", OPENAI_API_KEY=token)
    result = subprocess.run([sys.executable, "-m", "tests.agents_traces_run", mode, workflow], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_hint_tells_reverse_mode_users_how_to_keep_traces_inside(reverse_gateway):
    log = reverse_gateway.log()
    assert "export OPENAI_AGENTS_DISABLE_TRACING=1" in log
    assert f'BackendSpanExporter(endpoint="{reverse_gateway.url}/v1/traces/ingest")' in log
    assert "forward mode (HTTPS_PROXY)" in log


def test_as_shipped_the_agents_sdk_sends_traces_around_a_reverse_gateway(reverse_gateway, callers, upstream):
    """The leak the hint is about, seen by the same capture the next test relies on."""
    run = _run_agent("default", f"keys-shipped-{secrets.token_hex(4)}", reverse_gateway.url, callers.alice)
    assert "Paris" in run["output"]
    assert "api.openai.com" in run["attempts"]


def test_traces_pointed_at_the_gateway_reach_it_and_no_other_host(reverse_gateway, callers, upstream):
    workflow = f"keys-inside-{secrets.token_hex(4)}"
    run = _run_agent("gateway", workflow, reverse_gateway.url, callers.alice)
    assert "Paris" in run["output"]
    assert run["attempts"] == []  # no connection beyond 127.0.0.1 was even tried
    [flow] = wait_for_flows(reverse_gateway.records,
                            lambda f: f.request.path == "/v1/traces/ingest" and workflow.encode() in f.request.content)
    assert flow.response.status_code == 200
    assert IDENTITY.get(flow)["name"] == "alice"
    uploads = [r for r in upstream.received if r.path == "/v1/traces/ingest"]
    assert uploads and workflow.encode() in uploads[-1].body
    assert callers.alice not in uploads[-1].headers.get("authorization", "")  # the upstream got the gateway's key
