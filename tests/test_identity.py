"""Service tokens (minting, hashing, storage, authentication) and the credential and identity header helpers."""

from __future__ import annotations

import base64

import pytest
import yaml

from auditgate.core.config import ConfigError
from auditgate.core.credentials import bearer_token
from auditgate.core.shipped import SHIPPED_RULES
from auditgate.identity.service_tokens import (
    Identity,
    add_service_token,
    load_service_tokens,
    mint_token,
    token_hash,
)


def test_tokens_are_random_and_prefixed():
    tokens = {mint_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(t.startswith("agt_") and len(t) >= 40 for t in tokens)


def test_add_and_authenticate(tmp_path):
    (tmp_path / "identities.yaml").write_text("# keep this header\nservice_tokens: []\n")
    token = add_service_token(tmp_path, "agent-7", ["agents", "high-risk"])
    text = (tmp_path / "identities.yaml").read_text()
    assert token not in text and token_hash(token) in text
    assert text.startswith("# keep this header\n")
    tokens = load_service_tokens(tmp_path)
    assert tokens.authenticate(token) == Identity("agent-7", ("agents", "high-risk"))
    assert tokens.authenticate(token + "x") is None
    assert tokens.authenticate(token[:-1]) is None
    assert Identity("agent-7", ("agents",)).as_metadata() == {"name": "agent-7", "groups": ["agents"],
                                                             "method": "service_token"}


def test_other_sections_survive_a_rewrite(tmp_path):
    (tmp_path / "identities.yaml").write_text("issuers:\n  - issuer: https://idp.example\nservice_tokens: []\n")
    add_service_token(tmp_path, "a", [])
    data = yaml.safe_load((tmp_path / "identities.yaml").read_text())
    assert data["issuers"] == [{"issuer": "https://idp.example"}]


def test_missing_file_means_no_identities_and_is_created(tmp_path):
    assert len(load_service_tokens(tmp_path)) == 0
    token = add_service_token(tmp_path, "first", [])
    assert load_service_tokens(tmp_path).authenticate(token).name == "first"


@pytest.mark.parametrize("entry, reason", [
    ({"name": "a", "token_sha256": "agt_plain"}, "never the token itself"),
    ({"name": "bad name", "token_sha256": "sha256:" + "0" * 64}, "'name' must match"),
    ({"name": "a", "token_sha256": "sha256:" + "0" * 64, "groups": "admins"}, "'groups' must be a list"),
    ({"name": "a", "token_sha256": "sha256:" + "0" * 64, "token": "x"}, "unknown key(s) token"),
])
def test_invalid_entries(tmp_path, entry, reason):
    (tmp_path / "identities.yaml").write_text(yaml.safe_dump({"service_tokens": [entry]}))
    with pytest.raises(ConfigError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_service_tokens(tmp_path)


def test_duplicates_are_refused(tmp_path):
    add_service_token(tmp_path, "a", [])
    with pytest.raises(ConfigError, match="already exists"):
        add_service_token(tmp_path, "a", [])
    digest = "sha256:" + "1" * 64
    (tmp_path / "identities.yaml").write_text(yaml.safe_dump({"service_tokens": [
        {"name": "a", "token_sha256": digest}, {"name": "b", "token_sha256": digest}]}))
    with pytest.raises(ConfigError, match="same token hash"):
        load_service_tokens(tmp_path)


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"), ("bearer   abc ", "abc"), ("Basic abc", None), ("Bearer", None), ("", None),
])
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_identity_headers_are_removed_whatever_their_case():
    from mitmproxy.http import Headers

    from auditgate.core.credentials import remove_identity_headers

    headers = Headers([(b"X-Auditgate-Identity", b'{"name":"admin"}'), (b"x-auditgate-groups", b"admins"),
                       (b"X-Forwarded-User", b"root"), (b"x-remote-user", b"root"), (b"x-kept", b"yes"),
                       (b"X-Forwarded-For", b"10.0.0.1")])
    assert remove_identity_headers(headers) == ["x-auditgate-groups", "x-auditgate-identity", "x-forwarded-user",
                                                "x-remote-user"]
    assert headers.fields == ((b"x-kept", b"yes"), (b"X-Forwarded-For", b"10.0.0.1"))
    assert remove_identity_headers(headers) == []


@pytest.mark.parametrize("value, credential", [
    ("Basic " + base64.b64encode(b"agent:eyJ.a.b").decode(), "eyJ.a.b"),
    ("basic " + base64.b64encode(b"agt_token:").decode(), "agt_token"),
    ("Basic " + base64.b64encode(b"agent:pass:with:colons").decode(), "pass:with:colons"),
    ("Basic !!!", None), ("Bearer abc", None), ("", None), ("Basic " + base64.b64encode(b":").decode(), None),
])
def test_proxy_credential(value, credential):
    from auditgate.core.credentials import proxy_credential

    assert proxy_credential(value) == credential


def test_rules_file_finds_the_line_of_nested_nodes(tmp_path):
    from auditgate.core.config import RulesFile

    path = tmp_path / "x.yaml"
    path.write_text("a: 1\nlist:\n  - k: v\n  - k: w\n    other: 2\n")
    file = RulesFile.read(path)
    assert file.line("list", 1, "other") == 5
    assert file.line("list", 0) == 3
    assert file.line("missing") is None
    assert file.line("list", 7) == 2  # no such item: the line of the closest node around it


def test_describe_names_the_identity_never_a_credential():
    oidc = Identity("a@example.com", ("agents",), "oidc", {"issuer": "https://idp", "subject": "u1", "jti": "j1"})
    assert oidc.describe() == "a@example.com (sub u1 of https://idp, jti j1) via oidc, groups [agents]"
    assert Identity("svc", ()).describe() == "svc via service_token, groups []"


def test_minting_keeps_the_comments_and_sections_around_the_tokens(tmp_path):
    original = (
        "# header\nservice_tokens:\n  - name: old\n    token_sha256: sha256:" + "2" * 64 + "\n"
        "# a comment about issuers\nissuers:\n  - issuer: https://idp.example  # the workforce IdP\n"
        "    audience: gw\n# authorization:\n#   grants: []\n"
    )
    (tmp_path / "identities.yaml").write_text(original)
    token = add_service_token(tmp_path, "new", ["agents"])
    text = (tmp_path / "identities.yaml").read_text()
    for kept in ("# header\n", "# a comment about issuers\n", "  # the workforce IdP\n", "# authorization:\n"):
        assert kept in text
    data = yaml.safe_load(text)
    assert [e["name"] for e in data["service_tokens"]] == ["old", "new"]
    assert data["issuers"] == [{"issuer": "https://idp.example", "audience": "gw"}]
    assert load_service_tokens(tmp_path).authenticate(token).name == "new"


def test_the_shipped_file_keeps_its_documentation_after_the_first_mint(tmp_path):

    shipped = (SHIPPED_RULES / "identities.yaml").read_text()
    (tmp_path / "identities.yaml").write_text(shipped)
    add_service_token(tmp_path, "operator", ["admins"])
    text = (tmp_path / "identities.yaml").read_text()
    assert "# issuers:" in text and "# authorization:" in text
    assert text.count("\n") > shipped.count("\n")


def test_an_edited_identities_file_is_parsed_off_the_event_loop_and_a_broken_edit_keeps_the_old(tmp_path,
                                                                                               monkeypatch):
    import asyncio
    import shutil
    import threading

    from auditgate.identity.identities_file import IdentitiesFile

    rules = tmp_path / "rules"
    shutil.copytree(SHIPPED_RULES, rules)
    (rules / "identities.yaml").write_text("service_tokens: []\n")
    identities = IdentitiesFile(rules)
    readers: list[threading.Thread] = []
    read = IdentitiesFile._read

    def spy(self, previous, generation):
        readers.append(threading.current_thread())
        return read(self, previous, generation)

    monkeypatch.setattr(IdentitiesFile, "_read", spy)
    add_service_token(rules, "carol", ["agents"])
    identities._watch.check_now()
    snapshot = asyncio.run(identities.refreshed())
    assert len(snapshot.authenticator.service_tokens) == 1 and snapshot.generation == 2
    assert readers and readers[-1] is not threading.main_thread()

    (rules / "identities.yaml").write_text("service_tokens: [oops\n")
    identities._watch.check_now()
    assert asyncio.run(identities.refreshed()) is snapshot
