"""A WebSocket upgrade to any path whose messages the gateway does not govern is refused (501) and recorded;
the Responses API's WebSocket mode and the Realtime API are governed (tests/test_websocket_gateway_e2e.py)."""

from __future__ import annotations

import httpx
import pytest

from auditgate.core.flow_contract import REFUSAL
from tests.records import wait_for_flows

pytestmark = pytest.mark.e2e


def _upgrades_seen(upstream) -> list:
    return [r for r in upstream.received if "websocket" in r.headers.get("upgrade", "").lower()]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses/resp_1/cancel", "/v1/realtime/calls"])
def test_an_upgrade_to_another_path_is_refused_openai_shaped_and_recorded(reverse_env, callers, records_root,
                                                                         upstream, path):
    response = httpx.get(f"{reverse_env.url}{path}", headers={
        "authorization": f"Bearer {callers.alice}", "connection": "Upgrade", "upgrade": "websocket",
        "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert response.status_code == 501 and response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["code"] == "gateway_websocket_unsupported"
    assert not _upgrades_seen(upstream)
    wait_for_flows(records_root / "reverse", lambda f: f.request.path == path and (
        REFUSAL.read(f.metadata) or {}).get("code") == "gateway_websocket_unsupported")


def test_without_the_mitmproxy_internals_sessions_are_governed_through_every_upgrade_is_refused(
        tmp_path, confdir, upstream_server, upstream):
    # A mitmproxy whose WebSocket relay is not the one the gateway knows (close codes, pings, sizes and injected
    # events are governed through it): found at start, and every upgrade refused rather than relayed ungoverned.
    from auditgate.identity.service_tokens import add_service_token
    from tests.conftest import gateway_env, make_rules
    from tests.gateway_process import ROOT, GatewayProcess

    rules = make_rules(tmp_path / "rules", upstreams=[])
    token = add_service_token(rules, "alice", ["agents"])
    gateway = GatewayProcess(tmp_path / "gw", rules=rules, records=tmp_path / "records", confdir=confdir,
                             env=gateway_env(), args=[
                                 "--mode", f"reverse:http://127.0.0.1:{upstream_server.port}",
                                 "--set", "approval_admin_listen=127.0.0.1:0",
                                 "-s", str(ROOT / "tests" / "websocket_internals_missing_addon.py")]).start()
    try:
        upgrade = httpx.get(f"{gateway.url}/v1/responses", headers={
            "authorization": f"Bearer {token}", "connection": "Upgrade", "upgrade": "websocket",
            "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="})
        plain = httpx.post(f"{gateway.url}/v1/responses", json={"model": "gpt-test", "input": "hi"},
                           headers={"authorization": f"Bearer {token}"})
    finally:
        gateway.stop()
    assert upgrade.status_code == 501
    assert upgrade.json()["error"]["code"] == "gateway_websocket_unsupported"
    assert not _upgrades_seen(upstream)
    assert plain.status_code == 200  # HTTP is governed as always
    assert "WebSocket upgrades will be refused (501)" in gateway.log()
    assert "WebsocketLayer.relay_messages (gone in this test)" in gateway.log()
