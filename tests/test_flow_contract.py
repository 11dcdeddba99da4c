"""The flow contract (one typed module for what addons leave on a flow) and request facts parsed once per flow."""

from __future__ import annotations

import json
import re

from mitmproxy.test import tflow

from auditgate.core import request_facts
from auditgate.core.flow_contract import ALL_KEYS, IDENTITY, REFUSAL
from auditgate.core.request_facts import facts_of
from tests.gateway_process import ROOT


def test_no_metadata_key_is_spelled_outside_the_contract():
    names = {key.name for key in ALL_KEYS}
    assert len(names) == len(ALL_KEYS) and all(name.startswith("auditgate.") for name in names)
    spelled = re.compile(r"""["'](auditgate\.[a-z_]+)["']""")
    offenders = []
    for path in [*ROOT.joinpath("auditgate").rglob("*.py"), *ROOT.joinpath("addons").glob("*.py")]:
        if path.name == "flow_contract.py":
            continue
        offenders += [f"{path.relative_to(ROOT)}: {m}" for m in spelled.findall(path.read_text()) if m in names]
    assert not offenders


def test_a_key_reads_and_writes_the_flow_metadata_and_a_metadata_mapping_read_back():
    flow = tflow.tflow()
    assert IDENTITY.get(flow) is None and not IDENTITY.on(flow)
    IDENTITY.set(flow, {"name": "alice", "groups": ["agents"], "method": "service_token"})
    assert flow.metadata["auditgate.identity"]["name"] == "alice"
    assert IDENTITY.read(flow.get_state()["metadata"]) == IDENTITY.get(flow)
    assert REFUSAL.pop(flow) is None and IDENTITY.pop(flow)["name"] == "alice" and not IDENTITY.on(flow)


def _flow(body: bytes, content_type: str = "application/json"):
    flow = tflow.tflow()
    flow.request.path = "/v1/responses"
    flow.request.headers["content-type"] = content_type
    flow.request.content = body
    return flow


def test_facts_are_parsed_once_per_flow_for_every_reader(monkeypatch):
    calls = []
    real_loads = request_facts.loads_strict
    monkeypatch.setattr(request_facts, "loads_strict", lambda *a, **k: calls.append(1) or real_loads(*a, **k))
    flow = _flow(json.dumps({"model": "gpt-x", "instructions": "be brief", "input": "hi",
                             "tools": [{"type": "function", "name": "Run_Shell"}]}).encode())
    # Authorization asks for the model, policy for texts and tools, approval for all three, audit for the model.
    assert facts_of(flow).model == "gpt-x"
    assert facts_of(flow).prompt_texts == ["be brief", "hi"] and facts_of(flow).tool_names == ["run_shell"]
    assert facts_of(flow) is facts_of(flow) and facts_of(flow).endpoint == "responses"
    assert len(calls) == 1


def test_facts_follow_a_body_that_was_replaced():
    flow = _flow(b'{"model": "a", "input": "card 4111 1111 1111 1111"}')
    assert facts_of(flow).prompt_texts == ["card 4111 1111 1111 1111"]
    flow.request.content = b'{"model": "b", "input": "card <CREDIT_CARD>"}'  # masked, or edited while held
    assert facts_of(flow).model == "b" and facts_of(flow).prompt_texts == ["card <CREDIT_CARD>"]


def test_the_model_of_a_form_upload_and_of_a_body_that_is_not_json():
    form = _flow(b"model=whisper-1&language=en", "application/x-www-form-urlencoded")
    assert facts_of(form).model == "whisper-1" and facts_of(form).payload is None
    text = _flow(b'{"model": "x"}', "text/plain")
    assert facts_of(text).model is None and facts_of(text).prompt_texts == ['{"model": "x"}']


def test_a_large_body_nobody_parsed_gives_its_model_without_a_parse(monkeypatch):
    big = json.dumps({"model": "gpt-big", "input": "x" * (request_facts.JSON_PARSE_LIMIT + 10)}).encode()
    flow = _flow(big)
    monkeypatch.setattr(request_facts, "loads_strict", lambda *a, **k: (_ for _ in ()).throw(AssertionError("parsed")))
    assert facts_of(flow).model == "gpt-big"
