"""Service tokens: minting, hashing, storage, authentication (no mitmproxy involved)."""

from __future__ import annotations

import pytest
import yaml

from addons.credentials import bearer_token
from addons.identity import (
    Identity,
    add_service_token,
    load_service_tokens,
    mint_token,
    token_hash,
)
from addons.rules_yaml import ConfigError


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
