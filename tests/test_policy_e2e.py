"""End to end: policy.yaml validated at start, reloaded while running (bad edits kept out), PII-typed rules."""

from __future__ import annotations

import time

import openai
import pytest

from auditgate.identity.service_tokens import add_service_token
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GATEWAY_SCRIPT, GatewayProcess, run_mitmdump
from tests.records import wait_for_flows

pytestmark = pytest.mark.e2e

PII_RULES = """default: allow
rules:
  - id: no-card-numbers
    match:
      endpoints: [responses, chat]
      pii: [CREDIT_CARD]
    action: block
    message: card numbers may not be sent to the model
"""


def test_an_invalid_policy_stops_the_start_with_file_line_and_reason(tmp_path, confdir):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    (rules / "policy.yaml").write_text("rules:\n  - id: a\n    match:\n      text: {regex: ['(oops']}\n    action: block\n")
    result = run_mitmdump(["-s", GATEWAY_SCRIPT, "--set", f"confdir={confdir}", "-p", "0",
                           "--set", f"gateway_rules={rules}", "--set", f"gateway_records={tmp_path / 'records'}",
                           "--set", "approval_admin_listen=127.0.0.1:0"], env=gateway_env(), timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{rules / 'policy.yaml'}:4: " in output and "invalid regular expression" in output


@pytest.fixture
def gateway(tmp_path, confdir, upstream_server):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    (rules / "policy.yaml").write_text(PII_RULES)
    (rules / "masking.yaml").write_text((rules / "masking.yaml").read_text().replace("\nworkers: 0\n", "\nworkers: 1\n"))
    token = add_service_token(rules, "alice", ["agents"])
    gw = GatewayProcess(tmp_path / "gw", rules=rules, records=tmp_path / "records", confdir=confdir,
                        env=gateway_env(), args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}",
                                                 "--set", "approval_admin_listen=127.0.0.1:0"]).start()
    gw.token = token
    yield gw
    gw.stop()


def _client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.token, max_retries=0)


def test_pii_condition_uses_the_masking_engine_on_the_prompt(gateway, upstream):
    client = _client(gateway)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="gpt-test", messages=[
            {"role": "system", "content": "You are a billing assistant."},
            {"role": "user", "content": "pii-e2e: charge 4111 1111 1111 1111 please"}])
    assert info.value.code == "gateway_blocked" and "no-card-numbers" in info.value.message
    # An email is PII too, but not what this rule is about; a card-like number in the model name is not prompt text.
    assert client.responses.create(model="4111-1111-1111-1111", input="pii-e2e: mail jane.roe@example.org").output_text
    assert [r.json()["input"] for r in upstream.received] == ["pii-e2e: mail jane.roe@example.org"]
    [blocked] = wait_for_flows(gateway.records, lambda f: f.response and f.response.status_code == 403)
    assert blocked.metadata["auditgate.policy"]["matched"] == {"endpoint": "chat", "pii": ["CREDIT_CARD"]}


def test_rules_reload_on_change_and_a_bad_edit_keeps_the_old_rules(gateway, upstream):
    client = _client(gateway)
    assert client.responses.create(model="gpt-test", input="reload-e2e pineapple").output_text
    path = gateway.rules / "policy.yaml"
    path.write_text(PII_RULES + "  - id: no-pineapple\n    match: {text: {keywords: [pineapple]}}\n    action: block\n")
    deadline = time.monotonic() + 10
    while True:
        try:
            client.responses.create(model="gpt-test", input="reload-e2e pineapple")
        except openai.PermissionDeniedError as e:
            assert "no-pineapple" in e.message
            break
        assert time.monotonic() < deadline, "the edited policy was not picked up"
        time.sleep(0.3)
    path.write_text(PII_RULES + "  - id: broken\n    action: allow-ish\n")
    deadline = time.monotonic() + 10
    while "keeping the previous policy" not in gateway.log():
        assert time.monotonic() < deadline, gateway.log()[-2000:]
        client.models.list()
        time.sleep(0.3)
    assert "policy.yaml:10: rule 'broken': unknown action 'allow-ish'" in gateway.log()
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model="gpt-test", input="reload-e2e pineapple")
