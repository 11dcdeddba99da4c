"""The JWT verification policy and the caller authenticator, without mitmproxy: keys made here, no network
except the local issuer on 127.0.0.1 where discovery is under test."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from auditgate.identity.authenticator import AuthFailure, CallerAuthenticator
from auditgate.identity.oidc_config import IssuerConfig
from auditgate.identity.oidc_keys import parse_jwks
from auditgate.identity.oidc_tokens import (
    TokenRejected,
    claimed_groups,
    looks_like_jwt,
    parse,
    verify,
)
from auditgate.identity.service_tokens import Identity, ServiceTokens, token_hash
from tests.oidc_issuer import LocalIssuer, b64url, make_key

# The gateway silences this itself (oidc_tokens); pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")


@pytest.fixture(scope="module")
def issuer():
    server = LocalIssuer()
    server.add_key("RSA")
    server.add_key("EC")
    server.add_key("OKP")
    server.start()
    yield server
    server.stop()


def _config(issuer: LocalIssuer, **changes) -> IssuerConfig:
    settings = {"issuer": issuer.url, "audiences": ("auditgate",), "jwks_refetch_interval_seconds": 1, **changes}
    return IssuerConfig(**settings)


def _verify(issuer: LocalIssuer, token: str, config: IssuerConfig | None = None) -> Identity:
    config = config or _config(issuer)
    parsed = parse(token)
    key = parse_jwks(issuer.jwks()).find(parsed.kid)
    assert key is not None
    return verify(parsed, config, key)


@pytest.mark.parametrize("kind", ["RSA", "EC", "OKP"])
def test_each_default_algorithm_verifies(issuer, kind):
    key = next(k for k in issuer.published if k.key_type == kind)
    identity = _verify(issuer, issuer.token(key=key, groups=["agents"], email="a@example.com", name="Ann"))
    assert identity.method == "oidc" and identity.groups == ("agents",)
    assert identity.name == "a@example.com"
    assert identity.extra["issuer"] == issuer.url and identity.extra["subject"] == "user-1"
    assert identity.extra["display_name"] == "Ann" and len(identity.extra["jti"]) == 32


def test_identity_metadata_never_holds_the_token(issuer):
    token = issuer.token(groups=["agents"])
    metadata = _verify(issuer, token).as_metadata()
    assert set(metadata) == {"name", "groups", "method", "issuer", "subject", "jti"}
    assert token not in repr(metadata) and token.split(".")[2] not in repr(metadata)


@pytest.mark.parametrize("claims, reason", [
    ({"lifetime": -120}, "token expired"),
    ({"nbf": int(time.time()) + 3600}, "not valid yet"),
    ({"iat": int(time.time()) + 3600}, "issued in the future"),
    ({"audience": "someone-else"}, "wrong audience"),
    ({"audience": ["someone-else", "another"]}, "wrong audience"),
    ({"iss": "https://idp.example"}, "wrong issuer"),
    ({"exp": None}, "missing claim(s) exp"),
    ({"subject": None}, "missing claim(s) sub"),
    ({"audience": None}, "missing claim(s) aud"),
    ({"exp": "tomorrow"}, "invalid claim 'exp'"),
])
def test_claims_are_checked(issuer, claims, reason):
    with pytest.raises(TokenRejected, match=reason.replace("(", r"\(").replace(")", r"\)")):
        _verify(issuer, issuer.token(**claims))


def test_clock_skew_is_tolerated_up_to_the_configured_seconds(issuer):
    token = issuer.token(lifetime=-30)  # expired 30 s ago
    assert _verify(issuer, token, _config(issuer, clock_skew_seconds=60)).name == "user-1"
    with pytest.raises(TokenRejected, match="expired"):
        _verify(issuer, token, _config(issuer, clock_skew_seconds=10))


def test_audience_lists_match_any_configured_audience(issuer):
    config = _config(issuer, audiences=("gw-a", "gw-b"))
    assert _verify(issuer, issuer.token(audience=["other", "gw-b"]), config)


@pytest.mark.parametrize("forge, reason", [
    ("alg_none", "algorithm 'none' is not allowed"),
    ("hs256", "algorithm 'HS256' is not allowed"),
])
def test_algorithm_attacks(issuer, forge, reason):
    token = issuer.forge_alg_none() if forge == "alg_none" else issuer.forge_hs256_with_public_key()
    parsed = parse(token)
    with pytest.raises(TokenRejected, match=reason):
        verify(parsed, _config(issuer), issuer.key)


def test_hmac_with_a_public_key_fails_even_where_hs256_were_allowed(issuer):
    # Configuration only admits asymmetric algorithms; below that, joserfc refuses an RSA key for HMAC.
    config = dataclasses.replace(_config(issuer), algorithms=("HS256", "RS256"))
    with pytest.raises(TokenRejected, match="key does not fit"):
        verify(parse(issuer.forge_hs256_with_public_key()), config, issuer.key)


def test_an_algorithm_outside_the_issuers_list_is_refused(issuer):
    ec_key = next(k for k in issuer.published if k.key_type == "EC")
    with pytest.raises(TokenRejected, match="'ES256' is not allowed"):
        _verify(issuer, issuer.token(key=ec_key), _config(issuer, algorithms=("RS256",)))


def test_tampered_payload_and_foreign_keys_fail_the_signature(issuer):
    token = issuer.token(groups=["agents"])
    with pytest.raises(TokenRejected, match="bad signature"):
        _verify(issuer, issuer.tamper(token, groups=["admins"]))
    # Signed by another key under a published kid.
    impostor = make_key("RSA", kid=issuer.key.kid)
    with pytest.raises(TokenRejected, match="bad signature"):
        _verify(issuer, issuer.sign(issuer.claims(), impostor))


def test_keys_offered_in_the_header_are_refused(issuer):
    published = next(k for k in issuer.published if k.key_type == "EC")
    attacker = make_key("EC", kid=published.kid)  # EC: a short key, so the header stays within size limits
    token = issuer.sign(issuer.claims(), attacker, header={"jwk": attacker.as_dict(private=False)})
    with pytest.raises(TokenRejected, match="jwk"):
        _verify(issuer, token)


@pytest.mark.parametrize("token", [
    "garbage", "a.b.c", "eyJhbGciOiJSUzI1NiJ9", "eyJhbGciOiJSUzI1NiJ9.e30", "eyJhbGciOiJSUzI1NiJ9.!!!.sig",
    b64url(b'{"alg":"RS256"}') + "." + b64url(b"[1,2]") + ".c2ln", "x" * 20000 + ".a.b",
])
def test_malformed_tokens(token):
    with pytest.raises(TokenRejected, match="malformed"):
        parse(token)


def test_truncated_tokens_are_refused(issuer):
    token = issuer.token()
    authenticator = _authenticator(issuer)
    for cut in (10, len(token) // 3, token.rindex(".") + 1, len(token) - 5):
        failure = asyncio.run(authenticator.authenticate(token[:cut]))
        assert isinstance(failure, AuthFailure) and failure.credential == "jwt", (cut, failure)


def test_looks_like_jwt():
    assert looks_like_jwt("a.b.c") and looks_like_jwt("eyJhbGciOi")
    assert not looks_like_jwt("agt_abc") and not looks_like_jwt("sk-test")


@pytest.mark.parametrize("claims, claim, groups", [
    ({"groups": ["a", "b"]}, "groups", ["a", "b"]),
    ({"groups": "a b"}, "groups", ["a", "b"]),
    ({"groups": ["a", 3, None, ""]}, "groups", ["a"]),
    ({}, "groups", []),
    ({"realm_access": {"roles": ["r1"]}}, "realm_access.roles", ["r1"]),
    ({"https://example.com/groups": ["g"]}, "https://example.com/groups", ["g"]),
    ({"groups": {"not": "a list"}}, "groups", []),
])
def test_claimed_groups(claims, claim, groups):
    assert claimed_groups(claims, claim) == groups


def test_groups_map_keeps_only_mapped_groups(issuer):
    config = _config(issuer, groups_map=(("idp-agents", ("agents",)), ("idp-ops", ("admins", "approvers"))))
    identity = _verify(issuer, issuer.token(groups=["idp-ops", "idp-agents", "unmapped"]), config)
    assert identity.groups == ("admins", "approvers", "agents")


# ---- the authenticator: service tokens and JWTs, keys fetched from the local issuer ----------------

def _authenticator(issuer: LocalIssuer, **changes) -> CallerAuthenticator:
    tokens = ServiceTokens({token_hash("agt_service-token"): Identity("svc", ("agents",))})
    return CallerAuthenticator(tokens, (_config(issuer, **changes),))


def test_authenticator_takes_service_tokens_and_jwts(issuer):
    authenticator = _authenticator(issuer)
    assert asyncio.run(authenticator.authenticate("agt_service-token")) == Identity("svc", ("agents",))
    identity = asyncio.run(authenticator.authenticate(issuer.token(groups=["agents"])))
    assert isinstance(identity, Identity) and identity.method == "oidc"
    for credential, kind in ((None, "none"), ("agt_wrong", "service_token"), ("a.b.c", "jwt")):
        failure = asyncio.run(authenticator.authenticate(credential))
        assert isinstance(failure, AuthFailure) and failure.credential == kind


def test_authenticator_blocking_variant_for_other_threads(issuer):
    authenticator = _authenticator(issuer)
    assert authenticator.authenticate_blocking(issuer.token()).method == "oidc"
    failure = authenticator.authenticate_blocking(issuer.token(lifetime=-600))
    assert isinstance(failure, AuthFailure) and "expired" in failure.reason


def test_untrusted_issuer_is_refused_without_any_fetch(issuer):
    other = LocalIssuer()
    other.add_key()
    authenticator = _authenticator(issuer)
    failure = asyncio.run(authenticator.authenticate(other.token()))
    assert "is not trusted" in failure.reason
    assert failure.as_metadata()["unverified_claims"]["iss"] == other.url


def test_refused_algorithms_cost_no_key_fetch(issuer):
    authenticator = _authenticator(issuer)
    before = issuer.jwks_requests + issuer.discovery_requests
    failure = asyncio.run(authenticator.authenticate(issuer.forge_alg_none()))
    assert "'none' is not allowed" in failure.reason
    assert issuer.jwks_requests + issuer.discovery_requests == before


def test_discovery_then_jwks_and_reuse_on_reload(issuer):
    authenticator = _authenticator(issuer)
    discovery = issuer.discovery_requests
    assert asyncio.run(authenticator.authenticate(issuer.token())).method == "oidc"
    assert issuer.discovery_requests == discovery + 1
    # Reloading identities.yaml with the issuer unchanged keeps its keys; a changed issuer starts afresh.
    same = CallerAuthenticator(authenticator.service_tokens, (_config(issuer),), previous=authenticator)
    changed = CallerAuthenticator(authenticator.service_tokens, (_config(issuer, clock_skew_seconds=5),),
                                  previous=authenticator)
    assert same.keys[issuer.url] is authenticator.keys[issuer.url]
    assert changed.keys[issuer.url] is not authenticator.keys[issuer.url]


def test_is_gateway_credential_tells_placeholders_apart(issuer):
    authenticator = _authenticator(issuer)
    assert authenticator.is_gateway_credential(issuer.token())
    assert authenticator.is_gateway_credential("agt_anything")
    assert not authenticator.is_gateway_credential("unused")
