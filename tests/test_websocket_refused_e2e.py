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
