"""identities.yaml's `issuers:` and `authorization:` sections: strict validation with file and line."""

from __future__ import annotations

import textwrap

import pytest

from auditgate.core.config import ConfigError
from auditgate.core.shipped import SHIPPED_RULES
from auditgate.identity.authenticator import CallerAuthenticator
from auditgate.identity.grants import authorization_from
from auditgate.identity.oidc_config import DEFAULT_ALGORITHMS, issuers_from
from auditgate.identity.service_tokens import read_identities_file


def _load(tmp_path, text: str):
    (tmp_path / "identities.yaml").write_text(textwrap.dedent(text))
    file = read_identities_file(tmp_path)
    return issuers_from(file), authorization_from(file)


def test_shipped_file_has_no_issuers_and_no_authorization():

    file = read_identities_file(SHIPPED_RULES)
    assert file.data["service_tokens"] == []
    assert issuers_from(file) == () and authorization_from(file) is None


def test_a_full_issuer_and_defaults(tmp_path):
    issuers, _ = _load(tmp_path, """
        issuers:
          - issuer: https://login.example.com/tenant/v2.0
            audience: [api://auditgate, auditgate]
            jwks_uri: https://login.example.com/keys
            groups_claim: roles
            groups_map: {idp-agents: agents, idp-ops: [admins, approvers]}
            algorithms: [RS256, PS256]
            clock_skew_seconds: 30
          - issuer: http://127.0.0.1:8081
            audience: auditgate
    """)
    full, minimal = issuers
    assert full.audiences == ("api://auditgate", "auditgate") and full.groups_claim == "roles"
    assert full.map_groups(["idp-ops", "other"]) == ("admins", "approvers")
    assert full.discovery_uri == "https://login.example.com/tenant/v2.0/.well-known/openid-configuration"
    assert minimal.algorithms == DEFAULT_ALGORITHMS and minimal.jwks_uri is None
    assert minimal.clock_skew_seconds == 60 and minimal.groups_claim == "groups"


@pytest.mark.parametrize("entry, reason, line", [
    ("issuer: https://a.example\n    audience: x\n    audiance: y", "unknown key(s) audiance", 5),
    ("issuer: http://idp.example.com\n    audience: x", "'issuer' must be the issuer's https URL", 3),
    ("issuer: https://a.example", "'audience' must be", 3),
    ("issuer: https://a.example\n    audience: x\n    algorithms: [HS256]", "'algorithms' must be", 5),
    ("issuer: https://a.example\n    audience: x\n    algorithms: [none]", "'algorithms' must be", 5),
    ("issuer: https://a.example\n    audience: x\n    algorithms: []", "'algorithms' must be", 5),
    ("issuer: https://a.example\n    audience: x\n    clock_skew_seconds: 3600", "from 0 to 300", 5),
    ("issuer: https://a.example\n    audience: x\n    jwks_refetch_interval_seconds: 0", "from 1 to", 5),
    ("issuer: https://a.example\n    audience: x\n    jwks_refresh_seconds: 600\n    jwks_expiry_seconds: 60",
     "must not be shorter", 6),
    ("issuer: https://a.example\n    audience: x\n    jwks_uri: http://keys.example.com", "'jwks_uri' must be", 5),
    ("issuer: https://a.example\n    audience: x\n    groups_map: [a, b]", "'groups_map' must map", 5),
    ("issuer: https://a.example\n    audience: x\n    ca_file: /nonexistent/ca.pem", "'ca_file' must name", 5),
    ("issuer: https://user:pw@a.example\n    audience: x", "'issuer' must be", 3),
])
def test_invalid_issuers_name_file_line_and_reason(tmp_path, entry, reason, line):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"service_tokens: []\nissuers:\n  - {entry}\n")
    assert reason in str(info.value) and "identities.yaml" in str(info.value)
    assert info.value.line == line, str(info.value)


def test_duplicate_issuers_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="listed twice"):
        _load(tmp_path, """
            issuers:
              - {issuer: "https://a.example", audience: x}
              - {issuer: "https://a.example", audience: y}
        """)


def test_authorization_grants(tmp_path):
    _, authorization = _load(tmp_path, """
        authorization:
          grants:
            - groups: [agents]
              models: [gpt-4o-mini]
            - groups: ["*"]
              endpoints: [/v1/models]
    """)
    first, second = authorization.grants
    assert first.groups == ("agents",) and first.upstreams is None and first.models == ("gpt-4o-mini",)
    assert second.covers(("anyone",)) and second.index == 1


@pytest.mark.parametrize("section, reason, line", [
    ("authorization:\n", "must be a mapping", 1),
    ("authorization:\n  rules: []\n", "unknown key(s) rules", 2),
    ("authorization:\n  grants:\n    - models: [x]\n", "'groups' is required", 3),
    ("authorization:\n  grants:\n    - groups: [a]\n      model: [x]\n", "unknown key(s) model", 4),
    ("authorization:\n  grants:\n    - groups: [a]\n      endpoints: [v1/responses]\n", "starting with '/'", 4),
    ("authorization:\n  grants:\n    - groups: [a]\n      upstreams: [https://api.openai.com]\n", "no scheme", 4),
    ("authorization:\n  grants:\n    - groups: a\n", "'groups' must be a non-empty list", 3),
])
def test_invalid_authorization(tmp_path, section, reason, line):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, section)
    assert reason in str(info.value)
    assert info.value.line == line, str(info.value)


def test_authenticator_from_rules_reads_both_kinds(tmp_path):
    (tmp_path / "identities.yaml").write_text(
        "service_tokens: []\nissuers:\n  - issuer: https://idp.example\n    audience: gw\n"
    )
    authenticator = CallerAuthenticator.from_rules(tmp_path)
    assert len(authenticator.service_tokens) == 0 and list(authenticator.issuers) == ["https://idp.example"]
