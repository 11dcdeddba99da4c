"""Every hook of every addon in the bundle fails closed: a test-only addon makes each one raise in turn.

A real mitmdump runs the bundle and, after it, ``tests/fault_injection_addon.py``, which replaces each
flow hook of each bundle addon's class so that a request naming it (``x-test-fault: policy.request``)
makes it raise, or silently do nothing (``=skip``). The real openai SDK sends one request per hook.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import httpx
import openai
import pytest

from auditgate.core.flow_contract import GUARD, REFUSAL
from auditgate.identity.service_tokens import add_service_token
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import ROOT, GatewayProcess
from tests.records import read_flows

pytestmark = pytest.mark.e2e

FAULT_ADDON = str(ROOT / "tests" / "fault_injection_addon.py")
POLICY = """default: allow
rules:
  - id: hold-wire-transfers
    match:
      text: {keywords: ["wire transfer"]}
    action: require_approval
    approvers: [security]
    timeout_seconds: 5
"""


@pytest.fixture(scope="module")
def faulty_gateway(tmp_path_factory, confdir, upstream_server):
    tmp = tmp_path_factory.mktemp("guard")
    rules = make_rules(tmp / "rules", upstreams=[])
    (rules / "policy.yaml").write_text(POLICY)
    token = add_service_token(rules, "alice", ["agents"])
    gateway = GatewayProcess(tmp / "gw", rules=rules, records=tmp / "records", confdir=confdir, env=gateway_env(),
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}",
                                   "--set", "approval_admin_listen=127.0.0.1:0", "-s", FAULT_ADDON]).start()
    deadline = time.monotonic() + 30
    while not (ready := re.search(r"fault injection ready: (.*)", gateway.log())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready, gateway.log()
    hooks = ready.group(1).split()
    yield gateway, token, hooks, tmp / "records"
    gateway.stop()


def read_entries(records):
    return [json.loads(line) for path in sorted((records / "audit").glob("audit-*.jsonl"))
            for line in path.read_bytes().splitlines()]


def _client(gateway, token, fault: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=30,
                         default_headers={"x-test-fault": fault})


def test_the_fault_addon_reaches_every_request_and_response_hook_of_the_bundle(faulty_gateway):
    _, _, hooks, _ = faulty_gateway
    for expected in ("upstream_routing.request", "caller_auth.request", "authorization.request", "policy.request",
                     "approval.request", "masking.request", "masking.response", "masking.responseheaders",
                     "key_custody.request", "key_custody.response", "request_gate.request", "overhead.response",
                     "flow_recorder.response", "audit_log.response"):
        assert expected in hooks, f"{expected} not patched: {hooks}"


def test_an_exception_in_any_hook_refuses_the_flow_and_nothing_unchecked_reaches_the_upstream(faulty_gateway,
                                                                                            upstream):
    gateway, token, hooks, records = faulty_gateway
    refused: dict[str, str] = {}
    not_refused: list[str] = []
    for hook in hooks:
        if hook.endswith(".http_connect"):
            continue  # forward mode only: a CONNECT is never sent in reverse mode
        marker = f"guard-{uuid.uuid4().hex}"
        try:
            _client(gateway, token, hook).responses.create(model="gpt-test", input=f"hello {marker}")
        except openai.APIStatusError as error:
            assert error.status_code == 500 and error.code == "gateway_internal_error", (hook, error)
            assert error.response.headers["x-should-retry"] == "false"
            assert "Traceback" not in error.response.text and "injected" not in error.response.text
        else:
            not_refused.append(hook)
            continue
        reached = [r for r in upstream.received if marker.encode() in r.body]
        if hook.split(".")[1] in ("requestheaders", "request"):
            assert not reached, f"{hook} raised, and the request went upstream all the same"
        refused[marker] = hook
    assert not not_refused, f"a raising hook let the flow through: {not_refused}"
    assert len(refused) >= 14

    # Each refusal is recorded with the guard's note, and has its audit entry (or, where the audit log's
    # own hook failed, an audit event naming the flow).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        flows = {f.id: f for f in read_flows(records)}
        guarded = {f.id: f for f in flows.values() if GUARD.read(f.metadata)}
        if len(guarded) >= len(refused) - 1:  # the recorder's own failing hook records nothing itself
            break
        time.sleep(0.2)
    for flow in guarded.values():
        note = GUARD.read(flow.metadata)
        assert note["error"] == "InjectedFault" and note["action"] == "refused", note
        assert REFUSAL.read(flow.metadata)["code"] == "gateway_internal_error"
        assert f"{note['addon']}.{note['hook']}" in refused.values()
        assert "injected fault" not in str(flow.metadata)  # the message may quote request data: never kept
    recorded_hooks = {f"{GUARD.read(f.metadata)['addon']}.{GUARD.read(f.metadata)['hook']}" for f in guarded.values()}
    assert set(refused.values()) - recorded_hooks <= {"flow_recorder.response"}
    entries = read_entries(records)
    failures = [e for e in entries if e.get("kind") == "hook_failed"]
    assert {f"{e['addon']}.{e['hook']}" for e in failures} == set(refused.values())


def test_a_hook_that_silently_did_nothing_is_caught_by_the_last_request_check(faulty_gateway, upstream):
    gateway, token, _, records = faulty_gateway
    for skipped, why, prompt in (("caller_auth.request", "no authenticated caller", "hello"),
                                 ("upstream_routing.request", "no upstream route", "hello"),
                                 ("policy.request", "no policy decision", "please make a wire transfer"),
                                 ("approval.request", "requires an approval", "please make a wire transfer")):
        marker = f"skip-{uuid.uuid4().hex}"
        with pytest.raises(openai.InternalServerError) as error:
            _client(gateway, token, f"{skipped}=skip").responses.create(model="gpt-test", input=f"{prompt} {marker}")
        assert error.value.code == "gateway_internal_error"
        assert why in error.value.message, (skipped, error.value.message)
        assert not [r for r in upstream.received if marker.encode() in r.body], skipped


def test_other_callers_are_served_while_hooks_fail(faulty_gateway, upstream):
    gateway, token, _, _ = faulty_gateway
    started = time.monotonic()
    response = httpx.post(f"{gateway.url}/v1/responses", json={"model": "gpt-test", "input": "hi"},
                          headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert response.status_code == 200 and time.monotonic() - started < 1
