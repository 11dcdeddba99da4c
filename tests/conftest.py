"""Shared fixtures: TLS material, the fake OpenAI upstreams, caller identities and running gateways."""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from auditgate.core.shipped import SHIPPED_RULES
from auditgate.identity.service_tokens import add_service_token
from tests.fake_openai import FakeOpenAI, FakeOpenAIServer
from tests.gateway_process import GatewayProcess
from tests.tls_material import TlsFiles, make_tls_files


def _taddons_context_exit_uninstalls_its_log_handler() -> None:
    """mitmproxy's taddons.context closes its event loop on exit but leaves its log handler on the root
    logger, so an INFO record from a later context (our loggers are capped at INFO, not above) would
    be sent to that closed loop. Make the test harness take its handler with it."""
    from mitmproxy.test import taddons

    original_exit = taddons.context.__exit__

    def exit_(self, *exc_info):
        self.master._legacy_log_events.uninstall()
        return original_exit(self, *exc_info)

    taddons.context.__exit__ = exit_


_taddons_context_exit_uninstalls_its_log_handler()

# Presidio's email recognizer pulls in tldextract, which would download a suffix list: keep it local.
_TLD_CACHE = Path(tempfile.gettempdir()) / "auditgate-tldextract-cache"
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("TLDEXTRACT_CACHE", str(_TLD_CACHE))
# The Agents SDK would upload traces to api.openai.com; tests never leave 127.0.0.1.
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"

# Shaped like a real key so a leak scan is meaningful; it only ever exists in the gateway's environment.
UPSTREAM_KEY = "sk-test-upstream-" + secrets.token_hex(24)


@dataclass
class Callers:
    """Service tokens of the test identities (the tokens exist only here and in callers' requests)."""

    alice: str
    bob: str

    def all(self) -> list[str]:
        return [self.alice, self.bob]


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("auditgate")


@pytest.fixture(scope="session")
def tls_files(session_dir) -> TlsFiles:
    return make_tls_files(session_dir / "tls")


@pytest.fixture(scope="session")
def confdir(session_dir) -> Path:
    """A mitmproxy confdir whose CA is generated once, before any gateway starts."""
    from mitmproxy.certs import CertStore

    directory = session_dir / "confdir"
    directory.mkdir()
    CertStore.from_store(directory, "mitmproxy", 2048)
    return directory


@pytest.fixture(scope="session")
def upstream_server() -> FakeOpenAIServer:
    server = FakeOpenAIServer(FakeOpenAI()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_upstream_server(tls_files) -> FakeOpenAIServer:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files.server_cert, tls_files.server_key)
    server = FakeOpenAIServer(FakeOpenAI(), context).start()
    yield server
    server.stop()


def _reset(fake: FakeOpenAI) -> FakeOpenAI:
    fresh = FakeOpenAI()
    fake.reply_text, fake.deltas, fake.event_delay = fresh.reply_text, fresh.deltas, fresh.event_delay
    fake.tool_arguments = fresh.tool_arguments
    fake.reply_overrides, fake.json_encoding, fake.stream_encoding = {}, None, None
    fake.received.clear()
    return fake


@pytest.fixture
def upstream(upstream_server) -> FakeOpenAI:
    """The plain-HTTP upstream's behaviour and log, reset for each test."""
    return _reset(upstream_server.fake)


@pytest.fixture
def tls_upstream(tls_upstream_server) -> FakeOpenAI:
    return _reset(tls_upstream_server.fake)


def make_rules(directory: Path, *, upstreams: list[dict], passthrough: list[dict] = ()) -> Path:
    """A rules directory: the shipped files, with the given upstream table."""
    shutil.copytree(SHIPPED_RULES, directory)
    (directory / "upstreams.yaml").write_text(yaml.safe_dump({"upstreams": upstreams, "passthrough": list(passthrough)}))
    (directory / "identities.yaml").write_text("service_tokens: []\n")
    return directory


@pytest.fixture(scope="session")
def rules_and_callers(session_dir, tls_upstream_server) -> tuple[Path, Callers]:
    rules = make_rules(
        session_dir / "rules",
        upstreams=[{"host": "localhost", "port": tls_upstream_server.port, "key_env": "OPENAI_API_KEY"}],
        passthrough=[{"host": "127.0.0.1", "port": tls_upstream_server.port}],
    )
    callers = Callers(
        alice=add_service_token(rules, "alice", ["agents"]),
        bob=add_service_token(rules, "bob", ["agents", "approvers"]),
    )
    return rules, callers


@pytest.fixture(scope="session")
def callers(rules_and_callers) -> Callers:
    return rules_and_callers[1]


@pytest.fixture(scope="session")
def records_root(session_dir) -> Path:
    return session_dir / "records"


def gateway_env() -> dict[str, str]:
    return {
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS": "",
        "TLDEXTRACT_CACHE": str(_TLD_CACHE),
    }


@pytest.fixture(scope="session")
def reverse_gateway(session_dir, rules_and_callers, confdir, upstream_server, records_root) -> GatewayProcess:
    rules, _ = rules_and_callers
    gateway = GatewayProcess(
        session_dir / "gw-reverse", rules=rules, records=records_root / "reverse", confdir=confdir,
        args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}"], env=gateway_env(),
    ).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="session")
def forward_gateway(session_dir, rules_and_callers, confdir, tls_files, records_root) -> GatewayProcess:
    rules, _ = rules_and_callers
    gateway = GatewayProcess(
        session_dir / "gw-forward", rules=rules, records=records_root / "forward", confdir=confdir,
        args=["--set", f"ssl_verify_upstream_trusted_ca={tls_files.ca_cert}"], env=gateway_env(),
    ).start()
    yield gateway
    gateway.stop()


@pytest.fixture
def reverse_env(monkeypatch, reverse_gateway, callers):
    """The environment an unmodified agent gets to use the gateway in reverse mode."""
    monkeypatch.setenv("OPENAI_BASE_URL", f"{reverse_gateway.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", callers.alice)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return reverse_gateway


@pytest.fixture
def forward_env(monkeypatch, forward_gateway, callers, confdir, tls_upstream_server):
    """The environment an unmodified agent gets in forward mode: a proxy, the gateway's CA, its token."""
    for name in ("https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", forward_gateway.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(confdir / "mitmproxy-ca-cert.pem"))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    # The TLS fake stands in for api.openai.com.
    monkeypatch.setenv("OPENAI_BASE_URL", f"https://localhost:{tls_upstream_server.port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", callers.alice)
    return forward_gateway


@pytest.fixture(autouse=True)
def _fresh_bundle_services():
    """Each test starts with no addon's services registered (addons from another test's harness may linger)."""
    from auditgate.core.flow_contract import services

    services.reset()
    yield
    services.reset()
