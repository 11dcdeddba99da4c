"""End to end: OIDC identities through a real mitmdump running the bundle, driven by the real openai SDK and
the real Agents SDK, against local OIDC issuers on 127.0.0.1: every request verified, group grants, the
identity attack matrix (each refused with 401 and recorded), key rotation, and no token on disk."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from auditgate.identity.service_tokens import add_service_token, token_hash
from tests.agent_app import run_agent
from tests.conftest import UPSTREAM_KEY, gateway_env, make_rules
from tests.gateway_process import GatewayProcess
from tests.oidc_issuer import LocalIssuer, make_key
from tests.records import files_containing, read_flows

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:EdDSA is deprecated")]

EXPECTED = "It is lovely. Tool said: sunny in Paris"
REFETCH_INTERVAL = 1


class Setup:
    """The issuers, the rules and the two gateways of this module."""

    def __init__(self, workforce: LocalIssuer, workload: LocalIssuer, rules: Path, service_token: str,
                 reverse: GatewayProcess, forward: GatewayProcess, records: Path) -> None:
        self.workforce, self.workload = workforce, workload
        self.rules, self.service_token = rules, service_token
        self.reverse, self.forward, self.records = reverse, forward, records

    def agent_token(self, **claims) -> str:
        claims.setdefault("groups", ["agents"])
        claims.setdefault("email", "agent-7@example.com")
        return self.workforce.token(**claims)


@pytest.fixture(scope="module")
def oidc(tmp_path_factory, confdir, upstream_server, tls_upstream_server, tls_files):
    workdir = tmp_path_factory.mktemp("oidc")
    workforce = LocalIssuer()
    workforce.add_key("RSA")
    workforce.start()
    workload = LocalIssuer()  # a second issuer at once: a workload IdP for agents, ES256, its own group names
    workload.add_key("EC")
    workload.start()
    rules = make_rules(workdir / "rules", upstreams=[{"host": "localhost", "port": tls_upstream_server.port}])
    identities = {
        "service_tokens": [],
        "issuers": [
            {"issuer": workforce.url, "audience": "auditgate", "jwks_refetch_interval_seconds": REFETCH_INTERVAL},
            {"issuer": workload.url, "audience": ["auditgate", "other"], "groups_claim": "roles",
             "groups_map": {"wl-agents": "agents"}, "algorithms": ["ES256"],
             "jwks_refetch_interval_seconds": REFETCH_INTERVAL},
        ],
        "authorization": {"grants": [
            {"groups": ["agents"], "models": ["gpt-test", "text-embedding-*"]},
            {"groups": ["agents"], "endpoints": ["/v1/models"]},
            {"groups": ["interns"], "endpoints": ["/v1/responses", "/v1/chat/completions"], "models": ["gpt-mini"]},
            {"groups": ["partners"], "upstreams": ["api.partner.example"]},
        ]},
    }  # fmt: skip
    (rules / "identities.yaml").write_text(yaml.safe_dump(identities, sort_keys=False))
    service_token = add_service_token(rules, "svc-agent", ["agents"])
    records = workdir / "records"
    reverse = GatewayProcess(workdir / "gw-reverse", rules=rules, records=records / "reverse", confdir=confdir,
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}"], env=gateway_env())
    forward = GatewayProcess(workdir / "gw-forward", rules=rules, records=records / "forward", confdir=confdir,
                             args=["--set", f"ssl_verify_upstream_trusted_ca={tls_files.ca_cert}"], env=gateway_env())
    try:
        with ThreadPoolExecutor(2) as pool:  # each start loads the whole bundle: do both at once
            list(pool.map(GatewayProcess.start, (reverse, forward)))
    except Exception:
        reverse.stop()
        forward.stop()
        raise
    yield Setup(workforce, workload, rules, service_token, reverse, forward, records)
    reverse.stop()
    forward.stop()
    workforce.stop()
    workload.stop()


@pytest.fixture
def reverse(monkeypatch, oidc):
    monkeypatch.setenv("OPENAI_BASE_URL", f"{oidc.reverse.url}/v1")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return oidc


@pytest.fixture
def forward(monkeypatch, oidc, confdir, tls_upstream_server):
    for name in ("https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", oidc.forward.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(confdir / "mitmproxy-ca-cert.pem"))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", f"https://localhost:{tls_upstream_server.port}/v1")
    return oidc


def _recorded(records: Path, marker: str, count: int = 1, timeout: float = 10.0) -> list:
    """The recorded flows whose request body holds marker (flows are written just after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        flows = [f for f in read_flows(records) if f.request.content and marker.encode() in f.request.content]
        if len(flows) >= count or time.monotonic() > deadline:
            return sorted(flows, key=lambda f: f.request.timestamp_start)
        time.sleep(0.05)


def _assert_upstream_saw_only_the_key(received, *tokens: str) -> None:
    assert received, "the upstream received nothing"
    for request in received:
        assert request.headers.get("authorization") == f"Bearer {UPSTREAM_KEY}"
        text = json.dumps(request.headers) + request.body.decode(errors="replace")
        assert not any(t in text for t in tokens)
        assert not any(h.lower().startswith("x-auditgate-") for h in request.headers)


# ---- identities that work ------------------------------------------------------------------------

@pytest.mark.parametrize("api", ["responses", "chat"])
def test_agents_sdk_reverse_with_a_jwt_as_api_key(reverse, upstream, monkeypatch, api):
    token = reverse.agent_token(name="Agent Seven")
    monkeypatch.setenv("OPENAI_API_KEY", token)
    upstream.reply_text = "It is lovely."
    marker = uuid.uuid4().hex
    assert asyncio.run(run_agent(api, f"What is the weather in Paris? {marker}")) == EXPECTED
    _assert_upstream_saw_only_the_key(upstream.received, token)
    flows = _recorded(reverse.records / "reverse", marker, 2)
    assert len(flows) == 2
    identity = flows[-1].metadata["auditgate.identity"]
    claims = json.loads(_b64(token.split(".")[1]))
    assert identity == {"name": "agent-7@example.com", "groups": ["agents"], "method": "oidc",
                        "issuer": reverse.workforce.url, "subject": "user-1", "email": "agent-7@example.com",
                        "display_name": "Agent Seven", "jti": claims["jti"]}
    assert flows[-1].metadata["auditgate.authorization"] == {"decision": "allow", "grant": 0}


def _b64(segment: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def test_agents_sdk_forward_with_a_jwt_as_api_key(forward, tls_upstream, monkeypatch):
    token = forward.agent_token()
    monkeypatch.setenv("OPENAI_API_KEY", token)
    tls_upstream.reply_text = "It is lovely."
    assert asyncio.run(run_agent("responses")) == EXPECTED
    _assert_upstream_saw_only_the_key(tls_upstream.received, token)


def test_agents_sdk_forward_with_the_jwt_only_in_proxy_credentials(forward, tls_upstream, monkeypatch):
    token = forward.agent_token(subject="proxy-user")
    host_port = forward.forward.url.removeprefix("http://")
    monkeypatch.setenv("HTTPS_PROXY", f"http://agent:{token}@{host_port}")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # the SDK insists on one; a placeholder leaves the proxy's
    tls_upstream.reply_text = "It is lovely."
    marker = uuid.uuid4().hex
    assert asyncio.run(run_agent("chat", f"What is the weather in Paris? {marker}")) == EXPECTED
    _assert_upstream_saw_only_the_key(tls_upstream.received, token)
    flows = _recorded(forward.records / "forward", marker, 2)
    assert [f.metadata["auditgate.identity"]["subject"] for f in flows] == ["proxy-user", "proxy-user"]
    assert all("proxyauth" not in f.metadata and "proxy-authorization" not in f.request.headers for f in flows)


def test_a_per_request_token_wins_over_proxy_credentials(forward, tls_upstream, monkeypatch):
    host_port = forward.forward.url.removeprefix("http://")
    monkeypatch.setenv("HTTPS_PROXY", f"http://agent:{forward.agent_token()}@{host_port}")
    intern = openai.OpenAI(api_key=forward.workforce.token(groups=["interns"]), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):  # the intern's token was used, not the proxy's
        intern.responses.create(model="gpt-test", input="hi")
    expired = openai.OpenAI(api_key=forward.agent_token(lifetime=-600), max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="expired"):  # and no fallback to the proxy's
        expired.responses.create(model="gpt-test", input="hi")
    assert tls_upstream.received == []


def test_a_second_issuer_with_mapped_groups(reverse, upstream):
    token = reverse.workload.token(roles=["wl-agents", "wl-unmapped"], subject="workload-9")
    response = openai.OpenAI(api_key=token, max_retries=0).responses.create(model="gpt-test", input="hi")
    assert response.output_text
    _assert_upstream_saw_only_the_key(upstream.received, token)


def test_service_tokens_keep_working_under_grants(reverse, upstream, oidc):
    marker = uuid.uuid4().hex
    client = openai.OpenAI(api_key=oidc.service_token, max_retries=0)
    client.responses.create(model="gpt-test", input=marker)
    [flow] = _recorded(oidc.records / "reverse", marker)
    assert flow.metadata["auditgate.identity"] == {
        "name": "svc-agent", "groups": ["agents"], "method": "service_token",
        "token_id": token_hash(oidc.service_token).removeprefix("sha256:")[:16]}


# ---- authorization -------------------------------------------------------------------------------

def test_a_group_without_the_model_gets_permission_denied_in_the_agents_sdk(reverse, upstream, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", reverse.workforce.token(groups=["interns"], email="intern@example.com"))
    marker = uuid.uuid4().hex
    with pytest.raises(openai.PermissionDeniedError) as info:
        asyncio.run(run_agent("responses", f"What is the weather in Paris? {marker}"))
    assert info.value.status_code == 403 and info.value.code == "gateway_forbidden"
    assert "model 'gpt-test' is not granted to group(s) [interns]" in info.value.message
    assert upstream.received == []
    [flow] = _recorded(reverse.records / "reverse", marker)
    assert flow.metadata["auditgate.identity"]["name"] == "intern@example.com"
    assert flow.metadata["auditgate.authorization"]["refused"] == "model"
    assert flow.metadata["auditgate.refusal"]["code"] == "gateway_forbidden"


def test_endpoint_and_upstream_refusals_name_what_was_refused(reverse, upstream):
    intern = openai.OpenAI(api_key=reverse.workforce.token(groups=["interns"]), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="endpoint /v1/embeddings"):
        intern.embeddings.create(model="gpt-mini", input="x")
    partner = openai.OpenAI(api_key=reverse.workforce.token(groups=["partners"]), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match=r"upstream 127\.0\.0\.1:\d+ is not granted"):
        partner.models.list()
    assert intern.responses.create(model="gpt-mini", input="hi").output_text  # what is granted works
    nobody = openai.OpenAI(api_key=reverse.workforce.token(groups=[]), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="no authorization grant covers a caller without groups"):
        nobody.models.list()
    assert [r.path for r in upstream.received] == ["/v1/responses"]


# ---- the attack matrix ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def attacks(oidc) -> dict[str, tuple[str, str]]:
    """name → (credential, words the refusal reason must contain)."""
    setup = oidc
    wf = setup.workforce
    valid = setup.agent_token()
    foreign = LocalIssuer()  # a real issuer with valid tokens, which this gateway does not trust
    foreign.add_key("RSA")
    return {
        "alg_none": (wf.forge_alg_none(groups=["admins"]), "algorithm 'none' is not allowed"),
        "hs256_with_the_rsa_public_key": (wf.forge_hs256_with_public_key(groups=["admins"]),
                                          "algorithm 'HS256' is not allowed"),
        "expired": (setup.agent_token(lifetime=-600), "token expired"),
        "nbf_in_the_future": (setup.agent_token(nbf=int(time.time()) + 3600), "not valid yet"),
        "wrong_iss": (setup.agent_token(iss="https://login.evil.example"), "is not trusted"),
        "iss_of_another_configured_issuer": (setup.agent_token(iss=setup.workload.url),
                                             "algorithm 'RS256' is not allowed"),
        "wrong_aud": (setup.agent_token(audience="another-service"), "wrong audience"),
        "tampered_payload": (wf.tamper(valid, groups=["admins"], sub="root"), "bad signature"),
        "signed_by_an_unpublished_key_under_a_published_kid": (
            wf.sign(wf.claims(groups=["agents"]), make_key("RSA", kid=wf.key.kid)), "bad signature"),
        "truncated": (valid[: len(valid) - 20], "bad signature"),
        "truncated_to_two_parts": (valid.rsplit(".", 1)[0], "malformed"),
        "garbage": ("eyJnYXJiYWdl.garbage.garbage", "malformed"),
        "not_a_token_at_all": ("hello-gateway", "invalid gateway token"),
        "valid_token_from_an_issuer_not_configured": (foreign.token(groups=["agents"]), "is not trusted"),
    }


ATTACKS = ["alg_none", "hs256_with_the_rsa_public_key", "expired", "nbf_in_the_future", "wrong_iss",
           "iss_of_another_configured_issuer", "wrong_aud", "tampered_payload",
           "signed_by_an_unpublished_key_under_a_published_kid", "truncated", "truncated_to_two_parts", "garbage",
           "not_a_token_at_all", "valid_token_from_an_issuer_not_configured"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_matrix_is_refused_and_recorded(reverse, upstream, attacks, attack):
    credential, words = attacks[attack]
    marker = f"attack-{attack}-{uuid.uuid4().hex}"
    client = openai.OpenAI(api_key=credential, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.responses.create(model="gpt-test", input=marker)
    assert info.value.status_code == 401 and info.value.code == "gateway_unauthenticated"
    assert words in info.value.message, info.value.message
    assert upstream.received == [], "a refused request must not reach the upstream"
    [flow] = _recorded(reverse.records / "reverse", marker)
    assert flow.response.status_code == 401
    assert flow.metadata["auditgate.refusal"]["code"] == "gateway_unauthenticated"
    assert words in flow.metadata["auditgate.auth_failure"]["reason"]
    assert "auditgate.identity" not in flow.metadata
    assert "authorization" not in flow.request.headers


def test_unknown_kid_is_refused_after_one_refetch(reverse, upstream):
    wf = reverse.workforce
    stranger = make_key("RSA")  # never published
    time.sleep(REFETCH_INTERVAL + 0.2)  # past the refetch rate limit left by earlier tests
    before = wf.jwks_requests
    marker = f"attack-unknown-kid-{uuid.uuid4().hex}"
    with pytest.raises(openai.AuthenticationError, match="unknown key id"):
        openai.OpenAI(api_key=wf.token(key=stranger), max_retries=0).responses.create(model="gpt-test", input=marker)
    assert wf.jwks_requests == before + 1, "an unknown kid costs exactly one refetch"
    # A burst of invented kids: refused, and the IdP is asked at most once per refetch interval (the
    # bound allows for a slow machine, on which the burst may outlast an interval).
    invented = [wf.token(key=make_key("EC")) for _ in range(5)]
    started = time.monotonic()
    for token in invented:
        with pytest.raises(openai.AuthenticationError, match="unknown key id"):
            openai.OpenAI(api_key=token, max_retries=0).models.list()
    allowed = 1 + int((time.monotonic() - started) / REFETCH_INTERVAL)
    assert wf.jwks_requests - (before + 1) <= allowed, (wf.jwks_requests - before, allowed)
    [flow] = _recorded(reverse.records / "reverse", marker)
    assert flow.metadata["auditgate.auth_failure"]["unverified_claims"]["kid"] == stranger.kid
    assert upstream.received == []


def test_key_rotation_without_restart(reverse, upstream):
    wf = reverse.workforce
    pid = reverse.reverse.proc.pid
    old = wf.key
    assert openai.OpenAI(api_key=reverse.agent_token(), max_retries=0).models.list()
    new = wf.add_key("RSA")  # the IdP publishes a new key and starts signing with it
    time.sleep(REFETCH_INTERVAL + 0.2)
    before = wf.jwks_requests
    response = openai.OpenAI(api_key=wf.token(key=new, groups=["agents"]), max_retries=0).models.list()
    assert response.data
    assert wf.jwks_requests == before + 1, "the new kid was fetched on first sight"
    wf.published.remove(old)  # the old key is retired at the IdP; cached tokens signed with it still verify
    assert openai.OpenAI(api_key=wf.token(key=old, groups=["agents"]), max_retries=0).models.list()
    assert reverse.reverse.proc.pid == pid and reverse.reverse.proc.poll() is None
    wf.published.insert(0, old)


def test_forged_identity_headers_are_stripped_refused_and_recorded(reverse, upstream):
    forged = {"X-Auditgate-Identity": json.dumps({"name": "admin", "groups": ["admins"]}),
              "X-Auditgate-Groups": "admins", "X-Forwarded-User": "admin", "X-Forwarded-Groups": "admins"}
    marker = f"attack-forged-headers-{uuid.uuid4().hex}"
    # Without a token, identity headers authenticate no one.
    client = openai.OpenAI(api_key="placeholder", default_headers=forged, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.responses.create(model="gpt-test", input=marker)
    assert info.value.code == "gateway_unauthenticated"
    [flow] = _recorded(reverse.records / "reverse", marker)
    assert flow.metadata["auditgate.removed_identity_headers"] == [
        "x-auditgate-groups", "x-auditgate-identity", "x-forwarded-groups", "x-forwarded-user"]
    assert "auditgate.identity" not in flow.metadata
    assert not any(h.lower().startswith("x-auditgate-") for h in flow.request.headers)
    # With a valid token, the identity is the token's; the forged headers never reach the upstream.
    marker = f"forged-with-token-{uuid.uuid4().hex}"
    client = openai.OpenAI(api_key=reverse.agent_token(groups=["interns"]), default_headers=forged, max_retries=0)
    assert client.responses.create(model="gpt-mini", input=marker).output_text
    [flow] = _recorded(reverse.records / "reverse", marker)
    assert flow.metadata["auditgate.identity"]["groups"] == ["interns"]
    for request in upstream.received:
        assert not {h.lower() for h in request.headers} & {"x-auditgate-identity", "x-forwarded-user",
                                                           "x-forwarded-groups", "x-auditgate-groups"}


def test_refused_connect_keeps_no_proxy_credentials(forward):
    token = forward.agent_token()
    host_port = forward.forward.url.removeprefix("http://")
    with httpx.Client(proxy=f"http://agent:{token}@{host_port}") as client:
        with pytest.raises(httpx.ProxyError, match="403"):
            client.get("https://not-an-upstream.invalid/v1/models")
    connects = []
    deadline = time.monotonic() + 10
    while not connects and time.monotonic() < deadline:
        connects = [f for f in read_flows(forward.records / "forward") if f.request.host == "not-an-upstream.invalid"]
        time.sleep(0.05)
    assert connects and "proxy-authorization" not in connects[-1].request.headers


# ---- nothing secret on disk or in the log (run last: it scans what the tests above left) -----------

def test_no_token_in_any_record_or_log(oidc, forward, tls_upstream, monkeypatch):
    # Some traffic of its own, so the scan means something when run alone.
    token = oidc.agent_token()
    host_port = oidc.forward.url.removeprefix("http://")
    monkeypatch.setenv("HTTPS_PROXY", f"http://agent:{token}@{host_port}")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    tls_upstream.reply_text = "It is lovely."
    marker = uuid.uuid4().hex
    assert asyncio.run(run_agent("responses", f"What is the weather in Paris? {marker}")) == EXPECTED
    assert len(_recorded(oidc.records / "forward", marker, 2)) == 2
    issued = oidc.workforce.issued + oidc.workload.issued
    # A signature alone lets no one in, but finding one would mean a token was kept somewhere.
    signatures = [t.rsplit(".", 1)[1] for t in issued if len(t.rsplit(".", 1)[1]) > 20]
    secrets = [UPSTREAM_KEY, oidc.service_token, *issued, *signatures]
    assert list(oidc.records.rglob("*.mitm")), "the gateways recorded nothing"
    assert files_containing(oidc.records, secrets) == []
    for gateway in (oidc.reverse, oidc.forward):
        log = gateway.log()
        assert "OIDC issuers:" in log  # the log is the gateway's, and it named the issuers it trusts
        assert not [s for s in secrets if s in log]
