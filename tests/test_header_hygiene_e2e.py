"""What of a caller's request reaches the upstream: its SDK's headers, never its identity, project or URL credentials.

A real mitmdump with the bundle, two reverse modes to two local upstreams that keep every request
they get (``tests/key_echo_upstream.py``): one with the default forwarded headers and the gateway's
own OpenAI-Organization / OpenAI-Project, one with its own ``forward_headers``. The callers are the
openai SDK and the Agents SDK, as a customer would run them.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import time

import httpx
import openai
import pytest
from mitmproxy.http import Headers, Request

from auditgate.core.credentials import (
    is_credential_query_name,
    remove_identity_headers,
    remove_query_credentials,
)
from auditgate.core.flow_contract import REMOVED_IDENTITY_HEADERS
from auditgate.identity.service_tokens import add_service_token
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GatewayProcess
from tests.key_echo_upstream import Http1EchoUpstream
from tests.records import files_containing, wait_for_flows

# Headers other authenticating proxies put in front of the services that trust them.
FOREIGN_IDENTITIES = {
    "x-ms-client-principal-name": "eve@contoso.example",
    "x-ms-client-principal": "eyJhdXRoX3R5cCI6ImFhZCJ9",
    "x-ms-token-aad-access-token": "eyJ0eXAi.aad.token",
    "x-goog-authenticated-user-email": "accounts.google.com:eve@example.com",
    "x-goog-iap-jwt-assertion": "eyJhbGci.iap.jwt",
    "cf-access-authenticated-user-email": "eve@example.com",
    "cf-access-jwt-assertion": "eyJhbGci.cf.jwt",
    "x-amzn-oidc-identity": "eve",
    "x-amzn-oidc-data": "eyJ0eXAi.alb.data",
    "x-forwarded-email": "eve@example.com",
}


# ---- the pieces, without a proxy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*FOREIGN_IDENTITIES, "X-MS-CLIENT-PRINCIPAL-ID", "x-auth-request-user",
                                  "x-pomerium-claim-email", "x-auditgate-identity", "remote-user"])
def test_every_family_of_identity_headers_is_removed(name):
    headers = Headers([(name.encode(), b"eve"), (b"content-type", b"application/json")])
    assert remove_identity_headers(headers) == [name.lower()]
    assert headers.fields == ((b"content-type", b"application/json"),)


@pytest.mark.parametrize("name, credential", [
    ("api_key", True), ("api-key", True), ("key", True), ("token", True), ("access_token", True),
    ("X-Amz-Security-Token", True), ("client_secret", True), ("sig", True), ("refresh_token", True),
    ("subscription-key", True), ("after", False), ("limit", False), ("api-version", False), ("include[]", False),
    ("order", False), ("model", False),
])
def test_credential_query_names(name, credential):
    assert is_credential_query_name(name) is credential


def test_query_credentials_come_off_and_the_rest_stays_in_order():
    request = Request.make("GET", "http://127.0.0.1/v1/files?after=f1&API_KEY=s3cret&limit=2&token=t0k&limit=3")
    assert remove_query_credentials(request) == ["api_key", "token"]
    assert request.path == "/v1/files?after=f1&limit=2&limit=3"
    assert remove_query_credentials(request) == []


# ---- through the gateway -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hygiene(tmp_path_factory, confdir):
    root = tmp_path_factory.mktemp("header-hygiene")
    default, custom = Http1EchoUpstream().start(), Http1EchoUpstream().start()
    rules = make_rules(root / "rules", upstreams=[
        {"host": "127.0.0.1", "port": default.port, "organization": "org-gateway", "project": "proj_gateway"},
        {"host": "127.0.0.1", "port": custom.port, "forward_headers": ["content-type", "accept", "x-custom-*"]},
    ])
    token = add_service_token(rules, "alice", ["agents"])
    gateway = GatewayProcess(root / "gw", rules=rules, records=root / "records", confdir=confdir, env=gateway_env(),
                             args=["--mode", f"reverse:http://127.0.0.1:{default.port}@{_free_port()}",
                                   "--mode", f"reverse:http://127.0.0.1:{custom.port}@{_free_port()}",
                                   "--set", "approval_admin_listen=127.0.0.1:0"]).start()
    pattern = r"reverse proxy to http://127\.0\.0\.1:(\d+) listening at 127\.0\.0\.1:(\d+)"
    deadline = time.monotonic() + 10
    while len(re.findall(pattern, gateway.log())) < 2:
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.05)
    ports = {int(up): int(gw) for up, gw in re.findall(pattern, gateway.log())}
    urls = {"default": f"http://127.0.0.1:{ports[default.port]}/v1", "custom": f"http://127.0.0.1:{ports[custom.port]}/v1"}
    yield {"gateway": gateway, "token": token, "urls": urls, "default": default, "custom": custom}
    gateway.stop()
    default.stop()
    custom.stop()


@pytest.mark.e2e
def test_the_sdks_headers_go_on_the_callers_identity_and_project_do_not(hygiene):
    marker = f"hygiene-{secrets.token_hex(4)}"
    client = openai.OpenAI(base_url=hygiene["urls"]["default"], api_key=hygiene["token"], max_retries=0,
                           organization="org-caller", project="proj_caller",
                           default_headers={**FOREIGN_IDENTITIES, "cookie": "session=abc", "traceparent": "00-1-2-01",
                                            "x-forwarded-for": "10.0.0.9"})
    assert client.responses.create(model="gpt-test", input=marker).output_text.startswith("Hello.")
    seen = hygiene["default"].behaviour.received[-1].headers
    assert seen["openai-organization"] == "org-gateway" and seen["openai-project"] == "proj_gateway"
    assert not set(seen) & {*FOREIGN_IDENTITIES, "cookie", "traceparent", "x-forwarded-for"}, seen
    # What the SDK sends for itself still arrives (its platform and retry headers, its user agent).
    assert seen["user-agent"].startswith("OpenAI/Python") and seen["x-stainless-lang"] == "python"
    assert {"accept", "content-type", "x-stainless-retry-count", "x-stainless-package-version"} <= set(seen)
    [flow] = wait_for_flows(hygiene["gateway"].records, lambda f: marker.encode() in (f.request.content or b""))
    removed = REMOVED_IDENTITY_HEADERS.get(flow)
    assert removed and set(FOREIGN_IDENTITIES) <= set(removed)  # the record says what the caller tried


@pytest.mark.e2e
def test_an_agents_sdk_run_keeps_its_own_headers(hygiene, monkeypatch):
    from agents import Agent, OpenAIResponsesModel, RunConfig, Runner

    client = openai.AsyncOpenAI(base_url=hygiene["urls"]["default"], api_key=hygiene["token"], max_retries=0)
    agent = Agent(name="hygiene", instructions="Answer briefly.",
                  model=OpenAIResponsesModel(model="gpt-test", openai_client=client))
    result = asyncio.run(Runner.run(agent, "hello", run_config=RunConfig(tracing_disabled=True)))
    assert str(result.final_output).startswith("Hello.")
    seen = hygiene["default"].behaviour.received[-1].headers
    assert seen["user-agent"].startswith("Agents/Python") and seen["x-stainless-async"].startswith("async:")
    assert seen["openai-organization"] == "org-gateway"


@pytest.mark.e2e
def test_an_upstream_forwards_only_the_headers_its_entry_names(hygiene):
    client = openai.OpenAI(base_url=hygiene["urls"]["custom"], api_key=hygiene["token"], max_retries=0,
                           default_headers={"x-custom-tenant": "blue", "x-other": "1"})
    client.responses.create(model="gpt-test", input="custom")
    seen = hygiene["custom"].behaviour.received[-1].headers
    assert seen["x-custom-tenant"] == "blue" and seen["content-type"] == "application/json"
    assert not [h for h in seen if h.startswith("x-stainless") or h in ("x-other", "user-agent", "openai-organization")]


@pytest.mark.e2e
def test_a_credential_in_the_url_reaches_no_record_log_or_upstream(hygiene):
    gateway, token, url = hygiene["gateway"], hygiene["token"], hygiene["urls"]["default"]
    # Only in the URL: refused (the gateway reads no credential there), and the URL is recorded without it.
    refused = httpx.post(f"{url}/responses?api_key={token}", json={"model": "gpt-test", "input": "in the url"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "gateway_unauthenticated"
    # Beside a proper token: the request goes on without it, its other parameters untouched.
    other = "sk-caller-" + secrets.token_hex(12)
    accepted = httpx.post(f"{url}/responses?key={other}&after=cursor_1&access_token={other}",
                          json={"model": "gpt-test", "input": "beside a token"},
                          headers={"authorization": f"Bearer {token}"})
    assert accepted.status_code == 200
    assert hygiene["default"].behaviour.received[-1].path == "/v1/responses?after=cursor_1"
    flows = wait_for_flows(gateway.records, lambda f: f.request.path.startswith("/v1/responses")
                           and (b"in the url" in f.request.content or b"beside a token" in f.request.content), count=2)
    assert sorted(f.request.path for f in flows) == ["/v1/responses", "/v1/responses?after=cursor_1"]
    assert files_containing(gateway.records, [token, other]) == []
    log = gateway.log()
    assert token not in log and other not in log
    assert "removed credential query parameter(s) sent by client 127.0.0.1: api_key" in log
