"""The policy addon in mitmproxy's test harness: prompt extraction, decisions on flows, the reload command."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons.policy import PolicyRules
from auditgate.core.request_facts import prompt_texts

POLICY = """rules:
  - id: no-pineapple
    match: {text: {keywords: [pineapple]}}
    action: block
    message: no fruit
  - id: hold-shells
    match: {tools: ['*shell*']}
    action: require_approval
    approvers: [approvers]
"""


def _flow(body: dict, path: str = "/v1/responses"):
    flow = tflow.tflow()
    flow.request.path = path
    flow.request.headers["content-type"] = "application/json"
    flow.request.content = json.dumps(body).encode()
    flow.metadata["auditgate.identity"] = {"name": "alice", "groups": ["agents"], "method": "service_token"}
    return flow


def test_prompt_text_is_every_text_leaf_and_no_structure():
    responses = {"model": "pineapple-1", "instructions": "be brief", "metadata": {"note": "x"},
                 "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                           {"type": "function_call_output", "call_id": "c1", "output": "tool said"}]}
    # Every text leaf: metadata too (exhaustive by construction); ids, types, roles and the model are structure.
    # The keys the caller chose (here the metadata's "note") are read too, as one last text.
    assert prompt_texts(responses, "responses") == ["be brief", "x", "hi", "tool said", "note"]
    chat = {"model": "m", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "u"}]}
    assert prompt_texts(chat, "chat") == ["sys", "u"]


def _request(addon, flow) -> None:
    asyncio.run(addon.request(flow))  # the request hook is async: a changed policy.yaml is parsed off the loop


@pytest.fixture
def rules(tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    return tmp_path


def test_decisions_on_flows_and_the_reload_command(rules):
    addon = PolicyRules()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_rules=str(rules))
        # The model name is not prompt text: only the prompt can trip a text rule.
        allowed = _flow({"model": "pineapple", "input": "hello"})
        _request(addon, allowed)
        assert allowed.response is None
        assert allowed.metadata["auditgate.policy"]["rule"] == "default"
        blocked = _flow({"model": "m", "input": "I like PINEAPPLE"})
        _request(addon, blocked)
        assert blocked.response.status_code == 403
        error = json.loads(blocked.response.content)["error"]
        assert error["code"] == "gateway_blocked" and error["message"] == "blocked by policy rule 'no-pineapple': no fruit"
        assert blocked.marked == ":no_entry:"
        # require_approval without an approval gate loaded fails closed.
        held = _flow({"model": "m", "input": "x", "tools": [{"type": "function", "name": "run_shell"}]})
        _request(addon, held)
        assert json.loads(held.response.content)["error"]["code"] == "gateway_approval_unavailable"

        # A body streamed past the hooks (stream_large_bodies) cannot be inspected: refused.
        streamed = _flow({"model": "m", "input": "hello"})
        streamed.request.stream = True
        _request(addon, streamed)
        assert json.loads(streamed.response.content)["error"]["code"] == "gateway_blocked"
        assert streamed.metadata["auditgate.policy"]["rule"] == "unreadable-body"

        (rules / "policy.yaml").write_text("rules:\n  - id: broken\n    action: nope\n")
        tctx.command(addon.reload)
        again = _flow({"model": "m", "input": "pineapple"})
        _request(addon, again)
        assert again.response.status_code == 403  # the invalid edit was not taken

        (rules / "policy.yaml").write_text("default: allow\nrules: []\n")
        tctx.command(addon.reload)
        after = _flow({"model": "m", "input": "pineapple"})
        _request(addon, after)
        assert after.response is None and after.metadata["auditgate.policy"]["rule"] == "default"


def test_invalid_policy_is_an_options_error(tmp_path):
    (tmp_path / "policy.yaml").write_text("rules:\n  - id: a\n    action: block\n    colour: red\n")
    addon = PolicyRules()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"policy.yaml:4: rules\[0\]: unknown key 'colour'"):
            tctx.configure(addon, gateway_rules=str(tmp_path))


def test_a_policy_that_crashes_refuses_the_request(rules, monkeypatch):
    from auditgate.policy.rules import Policy

    def crash(self, facts):
        raise RuntimeError("a rule met a shape it did not expect")

    from auditgate.core.guard import guard_addon

    addon = guard_addon(PolicyRules())  # as addons/gateway.py's bundle() loads it
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_rules=str(rules))
        monkeypatch.setattr(Policy, "decide", crash)
        flow = _flow({"model": "m", "input": "hello"})
        _request(addon, flow)  # unguarded, mitmproxy would log the escaping error and send the flow on
        assert flow.response.status_code == 500 and flow.response.headers["x-should-retry"] == "false"
        assert json.loads(flow.response.content)["error"]["code"] == "gateway_internal_error"
        assert flow.metadata["auditgate.refusal"]["code"] == "gateway_internal_error"


def test_an_edited_policy_is_compiled_off_the_event_loop_before_the_request_that_noticed_it(rules, monkeypatch):
    import threading

    policy_module = sys.modules[PolicyRules.__module__]
    threads: list[threading.Thread] = []
    load = policy_module.load_policy_dir

    def spy(directory):
        threads.append(threading.current_thread())
        return load(directory)

    addon = PolicyRules()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_rules=str(rules))
        monkeypatch.setattr(policy_module, "load_policy_dir", spy)
        (rules / "policy.yaml").write_text("default: allow\nrules: []\n")
        addon._watch.check_now()
        flow = _flow({"model": "m", "input": "pineapple"})
        _request(addon, flow)
        assert flow.response is None and flow.metadata["auditgate.policy"]["rule"] == "default"
        assert threads and threads[-1] is not threading.main_thread()
