"""Approvals across a gateway restart, with the admin port taken, and the webhook text (no upstream needed)."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest

from auditgate.approval.admin import parse_listen
from auditgate.approval.store import Approval
from auditgate.approval.webhook import slack_escape, webhook_message
from auditgate.identity.service_tokens import add_service_token
from tests.approval_gateway import AdminClient, add_test_rules, admin_url
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GatewayProcess


def test_slack_text_is_escaped_and_links_to_the_page():
    approval = Approval(id="apr_1", key="k", rule="r<&>", requester={"name": "alice"}, approver_groups=["approvers"],
                        created_at=0, expires_at=1, model="<!here>", method="POST", host="api.openai.com",
                        path="/v1/responses", preview="secret prompt")
    text = webhook_message(approval, "http://gw:8181/approvals")["text"]
    assert "&lt;!here&gt;" in text and "r&lt;&amp;&gt;" in text and "<!here>" not in text
    assert text.endswith("<http://gw:8181/approvals#apr_1|Open the approvals page>")
    assert "secret prompt" not in text
    assert slack_escape("a&b<c>") == "a&amp;b&lt;c&gt;"


@pytest.mark.parametrize("value, parsed", [("127.0.0.1:8181", ("127.0.0.1", 8181)), ("[::1]:0", ("::1", 0))])
def test_admin_listen_option(value, parsed):
    assert parse_listen(value) == parsed


@pytest.mark.parametrize("value", ["8181", "127.0.0.1:", "127.0.0.1:99999", ":8181"])
def test_admin_listen_option_rejects(value):
    with pytest.raises(ValueError):
        parse_listen(value)


def _gateway(tmp_path, confdir, upstream_server, rules, listen="127.0.0.1:0", name="gw") -> GatewayProcess:
    return GatewayProcess(tmp_path / name, rules=rules, records=tmp_path / "records", confdir=confdir,
                          env=gateway_env(), args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}",
                                                   "--set", f"approval_admin_listen={listen}"]).start()


@pytest.mark.e2e
def test_after_a_restart_the_requests_held_before_are_closed_as_expired(tmp_path, confdir, upstream_server, upstream):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    add_test_rules(rules)
    alice, bob = add_service_token(rules, "alice", ["agents"]), add_service_token(rules, "bob", ["approvers"])
    gateway = _gateway(tmp_path, confdir, upstream_server, rules)
    out: dict = {}

    def call():
        try:
            openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=alice, max_retries=0).responses.create(
                model="gpt-test", input="restart-e2e needs-approval-marker")
        except Exception as e:
            out["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    try:
        [pending] = AdminClient(admin_url(gateway), bob).wait_pending()
    finally:
        gateway.stop()
    thread.join(15)
    assert "error" in out and upstream.received == []  # the held request died with the gateway, unsent
    again = _gateway(tmp_path, confdir, upstream_server, rules, name="gw2")
    try:
        approver = AdminClient(admin_url(again), bob)
        assert approver.pending() == []
        status, shown = approver.call("GET", f"/api/approvals/{pending['id']}")
        assert status == 200 and shown["status"] == "expired" and "stopped" in shown["reason"]
        status, body = approver.approve(pending["id"])
        assert (status, body["error"]["code"]) == (409, "already_decided")
        assert "closed as expired" in again.log()
    finally:
        again.stop()
    assert upstream.received == []


@pytest.mark.e2e
def test_a_taken_admin_port_does_not_stop_the_gateway_and_holds_fail_closed(tmp_path, confdir, upstream_server,
                                                                              upstream):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    add_test_rules(rules)
    alice = add_service_token(rules, "alice", ["agents"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gateway = _gateway(tmp_path, confdir, upstream_server, rules, listen=f"127.0.0.1:{taken.getsockname()[1]}")
        try:
            deadline = time.monotonic() + 10
            while "the admin listener could not listen" not in gateway.log():
                assert time.monotonic() < deadline, gateway.log()
                time.sleep(0.1)
            client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=alice, max_retries=0)
            assert client.responses.create(model="gpt-test", input="plain request").output_text
            with pytest.raises(openai.PermissionDeniedError) as info:
                client.responses.create(model="gpt-test", input="times-out-marker")
            assert info.value.code == "gateway_approval_timeout"
        finally:
            gateway.stop()
