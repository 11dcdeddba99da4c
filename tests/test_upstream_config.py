"""The upstream table: loading, validation and matching (no mitmproxy involved)."""

from __future__ import annotations

import pytest

from auditgate.core.config import ConfigError
from auditgate.core.shipped import SHIPPED_RULES
from auditgate.routing.upstreams import Upstream, load_upstreams


def _write(tmp_path, text: str):
    (tmp_path / "upstreams.yaml").write_text(text)
    return tmp_path


def test_shipped_defaults_serve_openai_only(tmp_path):

    table = load_upstreams(SHIPPED_RULES)
    assert table.upstream_for("api.openai.com", 443) == Upstream("api.openai.com", 443, "OPENAI_API_KEY")
    assert table.upstream_for("api.openai.com", 80) is None
    assert table.upstream_for("example.com", 443) is None
    assert table.passthrough == ()


def test_matching_by_host_and_port(tmp_path):
    table = load_upstreams(_write(tmp_path, """
upstreams:
  - host: API.example.com
  - host: azure.example.com
    port: 8443
    key_file: /run/key
    key_header: api-key
passthrough:
  - host: pypi.org
"""))
    assert table.upstream_for("api.example.com", 1234).key_env == "OPENAI_API_KEY"
    azure = table.upstream_for("AZURE.example.com", 8443)
    assert azure.key_source == "file:/run/key" and azure.auth_header_value("k") == "k"
    assert table.upstream_for("azure.example.com", 443) is None
    assert table.is_passthrough("pypi.org", 443) and not table.is_passthrough("api.example.com", 443)
    # In reverse mode an unlisted target is the upstream, on the default key.
    assert table.reverse_target("other.example", 443).key_source == "env:OPENAI_API_KEY"


def test_key_sources(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    assert Upstream("h", key_env=None, key_file=str(key_file)).read_key() == "sk-from-file"
    assert Upstream("h", key_env=None, key_file=str(tmp_path / "missing")).read_key() is None
    assert Upstream("h", key_env="AG_TEST_KEY").read_key({"AG_TEST_KEY": " sk-env "}) == "sk-env"
    assert Upstream("h", key_env="AG_TEST_KEY").read_key({"AG_TEST_KEY": ""}) is None
    assert Upstream("h").auth_header_value("sk-x") == "Bearer sk-x"


@pytest.mark.parametrize("text, reason", [
    ("upstreams:\n  - host: a.example\n    keyenv: X\n", "unknown key(s) keyenv"),
    ("upstream: []\n", "unknown key(s) upstream"),
    ("upstreams:\n  - host: https://a.example\n", "'host' must be a host name"),
    ("upstreams:\n  - host: a.example:443\n", "'host' must be a host name"),
    ("upstreams:\n  - host: a.example\n    port: 70000\n", "'port' must be a number"),
    ("upstreams:\n  - host: a.example\n    key_env: A\n    key_file: /k\n", "not both"),
    ("upstreams: {host: a}\n", "must be a list of mappings"),
    ("upstreams:\n  - host: a.example\npassthrough:\n  - host: a.example\n", "both as an upstream and as pass-through"),
    ("upstreams: [\n", "invalid YAML"),
    ("- just a list\n", "mapping at the top level"),
])
def test_invalid_files_name_the_reason(tmp_path, text, reason):
    with pytest.raises(ConfigError) as info:
        load_upstreams(_write(tmp_path, text))
    assert reason in str(info.value) and "upstreams.yaml" in str(info.value)


def test_yaml_errors_carry_a_line_number(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_upstreams(_write(tmp_path, "upstreams:\n  - host: a\n  bad: [\n"))
    assert info.value.line is not None


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_upstreams(tmp_path)


def test_ipv6_hosts_are_accepted(tmp_path):
    table = load_upstreams(_write(tmp_path, "upstreams:\n  - host: '::1'\n"))
    assert table.upstream_for("::1", 443)


# ---- which caller headers go on, and the gateway's own organization and project ---------------------------------
def test_forwarded_headers_default_to_what_the_sdks_send(tmp_path):
    upstream = load_upstreams(_write(tmp_path, "upstreams:\n  - host: a.example\n")).upstream_for("a.example", 443)
    for name in ("content-type", "accept", "accept-encoding", "user-agent", "openai-beta", "idempotency-key",
                 "x-stainless-lang", "x-stainless-retry-count", "host", "content-length", "transfer-encoding"):
        assert upstream.forwards(name), name
    for name in ("cookie", "openai-organization", "openai-project", "x-forwarded-for", "traceparent",
                 "x-ms-client-principal-name", "authorization", "api-key", "x-stainless"):
        assert not upstream.forwards(name), name
    assert upstream.gateway_headers() == {}


def test_an_upstream_names_its_own_forwarded_headers_organization_and_project(tmp_path):
    table = load_upstreams(_write(tmp_path, """
upstreams:
  - host: a.example
    forward_headers: [Content-Type, x-tenant-*]
    organization: org-gateway
    project: proj_gateway
"""))
    upstream = table.upstream_for("a.example", 443)
    assert upstream.forwards("content-type") and upstream.forwards("x-tenant-id") and upstream.forwards("host")
    assert not upstream.forwards("user-agent") and not upstream.forwards("x-stainless-lang")
    assert upstream.gateway_headers() == {"openai-organization": "org-gateway", "openai-project": "proj_gateway"}


@pytest.mark.parametrize("entry, reason", [
    ("forward_headers: [authorization]", "carries a credential"),
    ("forward_headers: [X-Api-Key]", "carries a credential"),
    ("key_header: x-key\n    forward_headers: [x-key]", "carries a credential"),
    ("forward_headers: [x-ms-client-principal-name]", "asserts an identity"),
    ("forward_headers: [cf-access-authenticated-user-email]", "asserts an identity"),
    ("forward_headers: [OpenAI-Organization]", "set by the gateway"),
    ("forward_headers: [openai-project]", "set by the gateway"),
    ("forward_headers: ['*']", "a lone '*' is not allowed"),
    ("forward_headers: ['bad header']", "is not a header name"),
    ("forward_headers: ['x-*-y']", "is not a header name"),
    ("forward_headers: content-type", "must be a list of header names"),
    ("organization: ''", "'organization' must be a non-empty string"),
    ("project: \"p\\nx-evil: 1\"", "'project' must be a non-empty string on one line"),
])
def test_forwarded_headers_that_would_let_a_caller_choose_credentials_or_identity_are_refused(tmp_path, entry, reason):
    with pytest.raises(ConfigError) as info:
        load_upstreams(_write(tmp_path, f"upstreams:\n  - host: a.example\n    {entry}\n"))
    assert reason in str(info.value) and info.value.line is not None
