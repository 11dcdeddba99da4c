"""Every rules file goes through one loader: strict keys, duplicate keys refused, and file:line in each error."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from auditgate.core.config import ConfigError, RulesFile
from auditgate.core.shipped import SHIPPED_RULES
from auditgate.identity.authenticator import CallerAuthenticator
from auditgate.identity.grants import authorization_from
from auditgate.identity.identities_file import identities_file
from auditgate.identity.service_tokens import read_identities_file
from auditgate.masking.config import load_masking_settings
from auditgate.policy.rules import load_policy
from auditgate.routing.upstreams import load_upstreams


@pytest.fixture
def rules(tmp_path):
    return shutil.copytree(SHIPPED_RULES, tmp_path / "rules")


def _write(path, text: str) -> None:
    path.write_text(textwrap.dedent(text).lstrip("\n"))


def _error(load) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        load()
    return raised.value


def test_the_shipped_rules_all_load(rules):
    assert load_upstreams(rules).upstreams
    assert load_policy(rules / "policy.yaml").rules
    assert load_masking_settings(rules) is not None
    assert CallerAuthenticator.from_rules(rules) is not None


@pytest.mark.parametrize("file, text, line, words", [
    ("upstreams.yaml", """
        upstreams:
          - host: api.openai.com
            keyenv: X
        """, 3, "unknown key(s) keyenv"),
    ("upstreams.yaml", """
        upstreams:
          - host: api.openai.com
            port: 99999
        """, 3, "'port' must be a number"),
    ("identities.yaml", """
        service_tokens:
          - name: x
            token_sha256: agt_plaintext
        """, 3, "never the token itself"),
    ("identities.yaml", """
        issuers:
          - issuer: http://idp.example.com
            audience: gateway
        """, 2, "'issuer' must be"),
    ("identities.yaml", """
        authorization:
          grants:
            - groups: [agents]
              endpoints: [v1/responses]
        """, 4, "'endpoints' must be"),
    ("masking.yaml", """
        response:
          enabled: true
        score_threshold: 7
        """, 3, "score_threshold must be"),
    ("policy.yaml", """
        rules:
          - id: a
            match: {}
            action: explode
        """, 4, "unknown action"),
])
def test_an_error_names_the_file_and_the_line(rules, file, text, line, words):
    _write(rules / file, text)
    loaders = {
        "upstreams.yaml": lambda: load_upstreams(rules),
        "identities.yaml": lambda: (CallerAuthenticator.from_rules(rules), authorization_from(read_identities_file(rules))),
        "masking.yaml": lambda: load_masking_settings(rules),
        "policy.yaml": lambda: load_policy(rules / "policy.yaml"),
    }
    error = _error(loaders[file])
    assert error.line == line and words in error.reason, str(error)
    assert str(error).startswith(f"{rules / file}:{line}: ")


def test_a_duplicate_key_is_an_error_not_a_silent_override(tmp_path):
    path = tmp_path / "x.yaml"
    _write(path, """
        upstreams: []
        upstreams:
          - host: a
        """)
    error = _error(lambda: RulesFile.read(path, {"upstreams"}))
    assert error.line == 2 and "duplicate key 'upstreams'" in error.reason


def test_identities_are_read_once_for_every_reader_and_reloaded_once(rules):
    from auditgate.identity.service_tokens import add_service_token

    add_service_token(rules, "alice", ["agents"])
    first, second = identities_file(rules), identities_file(rules)
    assert first is second  # caller auth, authorization and the approvals page share one reader
    before = first.current()
    (rules / "identities.yaml").write_text((rules / "identities.yaml").read_text() + textwrap.dedent("""
        authorization:
          grants:
            - groups: [agents]
        """))
    after = first.reload()
    # One new snapshot holds both the tokens and the grants: they cannot disagree between readers.
    assert after is first.current() is second.current() and after.generation == before.generation + 1
    assert len(after.authenticator.service_tokens) == 1 and len(after.authorization.grants) == 1
    # An invalid edit keeps the snapshot in force.
    (rules / "identities.yaml").write_text("service_tokens: 7\n")
    assert first.reload() is after


def test_token_new_makes_the_default_rules_dir_from_the_shipped_rules(tmp_path, monkeypatch, capsys):
    from auditgate.cli import main
    from auditgate.identity.service_tokens import load_service_tokens

    monkeypatch.chdir(tmp_path)
    assert main(["token", "new", "x", "--group", "agents"]) == 0
    token = capsys.readouterr().out.strip()
    assert sorted(p.name for p in (tmp_path / "rules").iterdir()) == sorted(p.name for p in SHIPPED_RULES.iterdir())
    assert load_service_tokens(tmp_path / "rules").authenticate(token).name == "x"
    # A directory named explicitly is never made up: a typo must not start from the permissive defaults.
    assert main(["token", "new", "y", "--rules", str(tmp_path / "typo")]) == 2
    assert not (tmp_path / "typo").exists()
