"""A request hook that crashes refuses its flow: the approvals store locked by another process, through mitmdump."""

from __future__ import annotations

import sqlite3

import openai
import pytest

from auditgate.approval.store import STORE_FILE
from auditgate.core.flow_contract import REFUSAL
from auditgate.identity.service_tokens import add_service_token
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GatewayProcess
from tests.records import wait_for_flows

pytestmark = pytest.mark.e2e

APPROVAL_RULES = """default: allow
rules:
  - id: hold-wire-transfers
    match:
      text: {keywords: ["wire transfer"]}
    action: require_approval
    approvers: [security]
    timeout_seconds: 30
"""


def test_a_locked_approvals_store_refuses_the_held_request_instead_of_sending_it(tmp_path, confdir, upstream_server,
                                                                                upstream):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    (rules / "policy.yaml").write_text(APPROVAL_RULES)
    token = add_service_token(rules, "alice", ["agents"])
    records = tmp_path / "records"
    gateway = GatewayProcess(tmp_path / "gw", rules=rules, records=records, confdir=confdir, env=gateway_env(),
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}",
                                   "--set", "approval_admin_listen=127.0.0.1:0"]).start()
    # Another process takes the store's write lock and keeps it: every write of the gateway's fails.
    locker = sqlite3.connect(records / STORE_FILE, timeout=1, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as refused:
            client.responses.create(model="gpt-test", input="please make a wire transfer of 5000 EUR")
        assert refused.value.code == "gateway_approvals_unavailable"
        assert refused.value.response.headers["x-should-retry"] == "false"
        # Nothing reached the upstream, and the refusal is recorded like any other.
        assert not [r for r in upstream.received if b"wire transfer" in r.body]
        [flow] = wait_for_flows(records, lambda f: f.response and f.response.status_code == 503)
        assert REFUSAL.read(flow.metadata)["code"] == "gateway_approvals_unavailable"
        assert "database is locked" in gateway.log()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        gateway.stop()
