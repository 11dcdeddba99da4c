"""WebSocket sessions are refused until the gateway governs their messages: the real openai SDK's
Responses WebSocket mode and Realtime API through a real mitmdump in reverse mode."""

from __future__ import annotations

import httpx
import openai
import pytest

from auditgate.core.flow_contract import REFUSAL
from tests.records import wait_for_flows

pytestmark = pytest.mark.e2e


def _upgrades_seen(upstream) -> list:
    return [r for r in upstream.received if "websocket" in r.headers.get("upgrade", "").lower()]


@pytest.mark.parametrize("api", ["responses", "realtime"])
def test_a_websocket_session_is_refused_and_never_reaches_the_upstream(reverse_env, upstream, api):
    client = openai.OpenAI(max_retries=0)
    with pytest.raises(Exception) as refused:
        if api == "responses":
            with client.responses.connect(max_retries=0) as connection:
                connection.response.create(model="gpt-test", input="hello")
                next(iter(connection))
        else:
            with client.realtime.connect(model="gpt-realtime") as connection:
                connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
                next(iter(connection))
    assert "501" in str(refused.value) or "gateway_websocket_unsupported" in str(refused.value), refused.value
    assert not _upgrades_seen(upstream)


def test_the_refusal_is_openai_shaped_and_recorded(reverse_env, callers, records_root, upstream):
    response = httpx.get(f"{reverse_env.url}/v1/responses", headers={
        "authorization": f"Bearer {callers.alice}", "connection": "Upgrade", "upgrade": "websocket",
        "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert response.status_code == 501 and response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["code"] == "gateway_websocket_unsupported"
    assert not _upgrades_seen(upstream)
    wait_for_flows(records_root / "reverse", lambda f: (REFUSAL.read(f.metadata) or {}).get("code")
                   == "gateway_websocket_unsupported")
