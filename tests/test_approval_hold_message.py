"""`services.approval_gate.hold_message`: one WebSocket message held for a second person, in mitmproxy's test
harness with the real store, the real admin listener and the admin API client of the approval tests."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from mitmproxy.test import taddons, tflow

from addons.approval import ApprovalGate
from auditgate.approval.store import STORE_FILE
from auditgate.core.flow_contract import services
from auditgate.core.shipped import SHIPPED_RULES
from auditgate.identity.service_tokens import add_service_token
from tests.approval_gateway import AdminClient, StoreLocker

POLICY = {"action": "require_approval", "rule": "ws-rule", "approvers": ["approvers"], "timeout_s": 30, "reuse_s": 0}


class AuditEvents:
    """Takes the audit entries the gate appends (the audit log addon is not loaded in this harness)."""

    unavailable = None

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def append_event(self, kind: str, fields: dict) -> dict:
        self.events.append((kind, fields))
        return fields


@pytest.fixture
def rules(tmp_path):
    directory = tmp_path / "rules"
    shutil.copytree(SHIPPED_RULES, directory)
    (directory / "identities.yaml").write_text("service_tokens: []\n")
    (directory / "masking.yaml").unlink()  # previews unmasked are never shown: this tests the hold, not Presidio
    return directory


def _ws_flow(identity: dict):
    flow = tflow.twebsocketflow()
    flow.request.path = "/v1/realtime?model=gpt-realtime"
    flow.metadata["auditgate.identity"] = identity
    return flow


async def _gate_scenario(tmp_path, rules, scenario, **options):
    alice, bob = add_service_token(rules, "alice", ["agents"]), add_service_token(rules, "bob", ["approvers"])
    gate = ApprovalGate()
    audit = AuditEvents()
    with taddons.context(gate) as tctx:
        tctx.configure(gate, gateway_rules=str(rules), gateway_records=str(tmp_path / "records"),
                       approval_admin_listen="127.0.0.1:0", **options)
        services.audit_events = audit
        await gate.running()
        try:
            identity = await gate.authenticate(alice)
            await scenario(gate, AdminClient(gate.admin_url, alice), AdminClient(gate.admin_url, bob),
                           _ws_flow(identity), audit)
        finally:
            services.audit_events = None
            gate.done()


async def _pending(client: AdminClient, count: int = 1) -> list[dict]:
    return await asyncio.to_thread(client.wait_pending, count=count)


def test_a_message_is_granted_by_a_second_person_never_by_its_sender(tmp_path, rules):
    async def scenario(gate, alice, bob, flow, audit):
        held = asyncio.ensure_future(gate.hold_message(flow, POLICY, ["please run rm -rf"]))
        [pending] = await _pending(bob)
        assert (pending["method"], pending["path"], pending["model"]) == ("WEBSOCKET", "/v1/realtime", "gpt-realtime")
        status, body = await asyncio.to_thread(alice.approve, pending["id"])
        assert (status, body["error"]["code"]) == (403, "self_approval_refused")
        assert not held.done()  # the refused self-approval released nothing
        status, _ = await asyncio.to_thread(bob.approve, pending["id"], "looks fine")
        assert status == 200
        record = await asyncio.wait_for(held, 5)
        assert (record["status"], record["id"], record["decided_by"]) == ("granted", pending["id"], "bob")
        assert record["refusals"][0]["code"] == "self_approval_refused"
        decisions = [(f["decision"], f["flow_id"], f["details"].get("message")) for k, f in audit.events]
        assert decisions == [("requested", flow.id, 1), ("refused_approved", flow.id, 1), ("approved", flow.id, 1)]
        # One approval sends one message: the same text again is a new request for approval.
        again = asyncio.ensure_future(gate.hold_message(flow, POLICY, ["please run rm -rf"]))
        [second] = await _pending(bob)
        assert second["id"] != pending["id"]
        await asyncio.to_thread(bob.deny, second["id"], "no")
        record = await asyncio.wait_for(again, 5)
        assert (record["status"], record["reason"]) == ("denied", "no")

    asyncio.run(_gate_scenario(tmp_path, rules, scenario))


def test_a_message_nobody_decides_expires_with_its_rule_timeout(tmp_path, rules):
    async def scenario(gate, alice, bob, flow, audit):
        record = await asyncio.wait_for(gate.hold_message(flow, {**POLICY, "timeout_s": 0.5}, ["hello"]), 5)
        assert record["status"] == "expired"
        assert [f["decision"] for _, f in audit.events] == ["requested", "expired"]

    asyncio.run(_gate_scenario(tmp_path, rules, scenario))


def test_a_reuse_window_grants_the_same_message_again_without_asking(tmp_path, rules):
    async def scenario(gate, alice, bob, flow, audit):
        policy = {**POLICY, "reuse_s": 60}
        held = asyncio.ensure_future(gate.hold_message(flow, policy, ["same text"]))
        [pending] = await _pending(bob)
        await asyncio.to_thread(bob.approve, pending["id"])
        assert (await asyncio.wait_for(held, 5))["status"] == "granted"
        record = await asyncio.wait_for(gate.hold_message(flow, policy, ["same text"]), 5)
        assert (record["status"], record["how"], record["id"]) == ("granted", "reused", pending["id"])

    asyncio.run(_gate_scenario(tmp_path, rules, scenario))


def test_a_locked_store_makes_the_message_unavailable_never_granted(tmp_path, rules):
    async def scenario(gate, alice, bob, flow, audit):
        with StoreLocker(tmp_path / "records" / STORE_FILE):
            record = await asyncio.wait_for(gate.hold_message(flow, POLICY, ["hello"]), 10)
        assert record["status"] == "unavailable"
        assert audit.events == []

    asyncio.run(_gate_scenario(tmp_path, rules, scenario, approval_store_busy_timeout_ms=200))


def test_a_message_whose_session_ended_is_closed_after_the_grace(tmp_path, rules):
    async def scenario(gate, alice, bob, flow, audit):
        held = asyncio.ensure_future(gate.hold_message(flow, POLICY, ["hello"]))
        [pending] = await _pending(bob)
        held.cancel()  # the WebSocket side stops waiting: its session ended
        for _ in range(100):
            status, shown = await asyncio.to_thread(bob.call, "GET", f"/api/approvals/{pending['id']}")
            if shown.get("status") != "pending":
                break
            await asyncio.sleep(0.1)
        assert (shown["status"], shown["reason"]) == ("expired", "the caller went away before a decision")

    asyncio.run(_gate_scenario(tmp_path, rules, scenario, approval_abandoned_grace_ms=0))
