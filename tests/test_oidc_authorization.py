"""Group grants: which upstreams, endpoints and models a caller's groups may use (no mitmproxy involved)."""

from __future__ import annotations

import pytest

from auditgate.identity.grants import Authorization, Grant, is_normal_path


def _rules() -> Authorization:
    return Authorization((
        Grant(groups=("agents",), upstreams=("api.openai.com",), models=("gpt-4o-mini", "gpt-4.1*"), index=0),
        Grant(groups=("agents",), upstreams=("api.openai.com",), endpoints=("/v1/models", "/v1/models/*"), index=1),
        Grant(groups=("research",), upstreams=("*.openai.azure.com:443",), endpoints=("/openai/deployments/*",), index=2),
        Grant(groups=("admins",), index=3),
    ))  # fmt: skip


def _decide(groups, host="api.openai.com", port=443, path="/v1/responses", model="gpt-4o-mini"):
    asked = []

    def model_of():
        asked.append(True)
        return model

    decision = _rules().decide(tuple(groups), host, port, path, model_of)
    return decision, bool(asked)


def test_allowed_by_the_first_grant_that_matches_everything():
    decision, _ = _decide(["agents"])
    assert decision.allowed and decision.grant == 0
    assert decision.as_metadata() == {"decision": "allow", "grant": 0}
    assert _decide(["agents"], model="gpt-4.1-nano")[0].allowed


def test_a_grant_without_models_does_not_read_the_body():
    decision, asked = _decide(["admins"], host="anything.example", path="/v1/files")
    assert decision.allowed and not asked
    decision, asked = _decide(["agents"], path="/v1/models", model=None)
    assert decision.allowed and decision.grant == 1 and not asked


@pytest.mark.parametrize("kwargs, refused, words", [
    ({"groups": ["interns"]}, "groups", "no authorization grant covers group(s) [interns]"),
    ({"groups": []}, "groups", "a caller without groups"),
    ({"groups": ["agents"], "host": "api.anthropic.com"}, "upstream", "upstream api.anthropic.com:443"),
    ({"groups": ["agents"], "path": "/v1/files"}, None, None),  # model-limited grant 0 still covers it
    ({"groups": ["research"], "host": "x.openai.azure.com", "port": 8443}, "upstream", "x.openai.azure.com:8443"),
    ({"groups": ["research"], "host": "x.openai.azure.com", "path": "/v1/responses"}, "endpoint", "endpoint /v1/responses"),
    ({"groups": ["agents"], "model": "gpt-4o"}, "model", "model 'gpt-4o' is not granted"),
    ({"groups": ["agents"], "model": None}, "model", "names no model"),
    ({"groups": ["agents"], "path": "/v1/models/../files", "model": None}, "endpoint_path", "not a normalised path"),
])
def test_refusals_name_what_was_refused(kwargs, refused, words):
    decision, _ = _decide(**kwargs)
    if refused is None:
        assert decision.allowed
        return
    assert not decision.allowed and decision.refused == refused
    assert words in decision.reason
    assert decision.as_metadata()["refused"] == refused


def test_hosts_match_with_or_without_port_and_globs():
    grant = Grant(groups=("g",), upstreams=("api.openai.com", "*.example.com:8443", "::1"))
    assert grant.allows_upstream("API.openai.com", 443)
    assert grant.allows_upstream("a.example.com", 8443) and not grant.allows_upstream("a.example.com", 443)
    assert grant.allows_upstream("::1", 9000)


def test_query_strings_do_not_change_the_endpoint():
    decision, _ = _decide(["agents"], path="/v1/models?after=x", model=None)
    assert decision.allowed and decision.grant == 1


@pytest.mark.parametrize("path, normal", [
    ("/v1/responses", True), ("/", True), ("/v1/responses/", True),
    ("/v1/../admin", False), ("/v1/./responses", False), ("//v1/responses", False), ("/v1//responses", False),
    ("/v1/%2e%2e/admin", False), ("/v1%2Fresponses", False), ("/v1\\responses", False), ("v1/responses", False),
])
def test_is_normal_path(path, normal):
    assert is_normal_path(path) is normal
