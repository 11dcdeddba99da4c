"""Runs an unmodified Agents SDK agent with tracing on, and reports every host it tried to reach beyond this machine.

Run as a subprocess (``python -m tests.agents_traces_run MODE WORKFLOW``) so the SDK's global trace
provider starts fresh. Every name lookup and socket connect is watched: one to a host other than
127.0.0.1 / localhost is recorded and refused (nothing leaves the machine), so an upload the SDK
sends around the gateway shows up as an attempt. MODE ``gateway`` points the SDK's trace exporter at
the gateway the way the start-up hint says; MODE ``default`` leaves the SDK as it ships.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

LOCAL = {"127.0.0.1", "localhost", "::1"}
attempts: list[str] = []

_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect


def _watched_getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and name not in LOCAL:
        attempts.append(str(name))
        raise socket.gaierror(socket.EAI_NONAME, f"{name}: not reachable from this test")
    return _getaddrinfo(host, *args, **kwargs)


def _watched_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL:
        attempts.append(str(address[0]))
        raise OSError(f"{address[0]}: not reachable from this test")
    return _connect(self, address)


socket.getaddrinfo = _watched_getaddrinfo
socket.socket.connect = _watched_connect


def main(mode: str, workflow: str) -> None:
    from agents import RunConfig, Runner, set_trace_processors
    from agents.tracing import get_trace_provider
    from agents.tracing.processors import (
        BackendSpanExporter,
        BatchTraceProcessor,
        default_exporter,
    )

    from tests.agent_app import build_agent

    if mode == "gateway":
        # What the start-up hint tells a reverse-mode user: the exporter's endpoint at the gateway.
        endpoint = os.environ["OPENAI_BASE_URL"].rstrip("/") + "/traces/ingest"
        set_trace_processors([BatchTraceProcessor(BackendSpanExporter(endpoint=endpoint))])
    else:
        exporter = default_exporter()
        exporter.max_retries, exporter.base_delay = 1, 0.01  # one attempt is enough to see where it goes
    result = asyncio.run(Runner.run(build_agent("responses"), "What is the weather in Paris?",
                                    run_config=RunConfig(workflow_name=workflow)))
    get_trace_provider().force_flush()
    print(json.dumps({"output": str(result.final_output), "attempts": attempts}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
