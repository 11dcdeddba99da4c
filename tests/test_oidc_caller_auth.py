"""The caller_auth addon in isolation (mitmproxy's own test harness, no network): where the credential comes
from, the CONNECT credential's lifetime, and what is left on the flow."""

from __future__ import annotations

import asyncio
import base64

from mitmproxy.test import taddons, tflow

from addons.caller_auth import CallerAuth
from auditgate.identity.service_tokens import add_service_token


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _scenario(tmp_path, steps):
    (tmp_path / "identities.yaml").write_text("service_tokens: []\n")
    token = add_service_token(tmp_path, "svc", ["agents"])
    auth = CallerAuth()

    async def run():
        with taddons.context(auth) as tctx:
            tctx.configure(auth, gateway_rules=str(tmp_path))
            return await steps(auth, token)

    return asyncio.run(run())


def _request(client_conn, authorization: str | None = None):
    flow = tflow.tflow()
    flow.client_conn = client_conn
    if authorization:
        flow.request.headers["authorization"] = authorization
    return flow


def test_connect_credential_serves_its_connection_until_disconnect(tmp_path):
    async def steps(auth, token):
        connect = tflow.tflow()
        connect.request.method = "CONNECT"
        connect.request.headers["proxy-authorization"] = _basic("agent", token)
        auth.http_connect(connect)
        assert "proxy-authorization" not in connect.request.headers
        client = connect.client_conn

        first = _request(client, "Bearer unused")  # the SDK's placeholder leaves the proxy's credential
        await auth.request(first)
        assert first.response is None and first.metadata["auditgate.identity"]["name"] == "svc"
        assert "authorization" not in first.request.headers

        other_connection = _request(tflow.tclient_conn(), "Bearer unused")
        await auth.request(other_connection)
        assert other_connection.response.status_code == 401

        auth.client_disconnected(client)
        after = _request(client, "Bearer unused")
        await auth.request(after)
        assert after.response.status_code == 401, "the credential is forgotten with its connection"

    _scenario(tmp_path, steps)


def test_a_gateway_credential_on_the_request_wins(tmp_path):
    async def steps(auth, token):
        connect = tflow.tflow()
        connect.request.headers["proxy-authorization"] = _basic("agent", token)
        auth.http_connect(connect)
        wrong = _request(connect.client_conn, "Bearer agt_not-a-valid-token")
        await auth.request(wrong)
        assert wrong.response.status_code == 401
        assert wrong.metadata["auditgate.auth_failure"] == {"reason": "invalid gateway token",
                                                           "credential": "service_token", "source": "authorization"}

    _scenario(tmp_path, steps)


def test_mitmproxy_proxyauth_password_is_used_and_removed(tmp_path):
    async def steps(auth, token):
        connect = tflow.tflow()
        connect.metadata["proxyauth"] = ("agent", token)  # what mitmproxy's proxyauth leaves, if switched on
        auth.http_connect(connect)
        assert "proxyauth" not in connect.metadata
        flow = _request(connect.client_conn)
        flow.metadata["proxyauth"] = ("agent", token)
        await auth.request(flow)
        assert flow.response is None and "proxyauth" not in flow.metadata
        assert token not in repr(flow.get_state())

    _scenario(tmp_path, steps)


def test_plain_http_proxy_requests_carry_their_own_proxy_credential(tmp_path):
    async def steps(auth, token):
        flow = _request(tflow.tclient_conn())
        flow.request.headers["proxy-authorization"] = _basic("agent", token)
        await auth.request(flow)
        assert flow.response is None and "proxy-authorization" not in flow.request.headers
        assert flow.metadata["auditgate.identity"]["name"] == "svc"

    _scenario(tmp_path, steps)
