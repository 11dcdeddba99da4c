"""Upstream timeouts through a real mitmdump with the bundle (masking on, as shipped) and the openai SDK.

A silent upstream (takes the request, never answers), one that stalls after a reply's head, an event
stream that stalls after two events, and a port whose connects never complete: each ends in a 504
``gateway_upstream_timeout`` (or, mid-stream, the SSE error event the SDK raises on) within the short
timeouts set here, recorded, while another caller is answered within a second. The same gateway also
listens in forward mode (HTTPS_PROXY, the upstream over TLS through a CONNECT tunnel), where a timeout
takes mitmproxy's error path instead.
"""

from __future__ import annotations

import ssl
import threading
import time

import httpx
import openai
import pytest
from mitmproxy.exceptions import FlowReadException

from auditgate.core.flow_contract import REFUSAL
from auditgate.identity.service_tokens import add_service_token
from tests.approval_gateway import AdminClient, add_test_rules, admin_url
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GatewayProcess
from tests.misbehaving_upstream import (
    MisbehavingUpstream,
    UnreachableUpstream,
    free_port,
)
from tests.records import read_flows

pytestmark = pytest.mark.e2e

TIMEOUT = 1.0  # each of connect, first byte and idle
TICK = TIMEOUT / 4  # how often the gateway reads its clocks


@pytest.fixture(scope="module")
def upstream():
    server = MisbehavingUpstream().start()
    yield server
    server.stop()


class TlsMisbehavingUpstream(MisbehavingUpstream):
    def __init__(self, tls_files) -> None:
        super().__init__()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tls_files.server_cert, tls_files.server_key)

    def get_request(self):
        sock, address = super().get_request()
        return self.context.wrap_socket(sock, server_side=True), address


@pytest.fixture(scope="module")
def tls_upstream(tls_files):
    server = TlsMisbehavingUpstream(tls_files).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def unreachable():
    port = UnreachableUpstream()
    yield port
    port.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, confdir, tls_files, upstream, tls_upstream, unreachable):
    root = tmp_path_factory.mktemp("timeouts")
    rules = make_rules(root / "rules", upstreams=[{"host": "localhost", "port": tls_upstream.port,
                                                    "key_env": "OPENAI_API_KEY"}])
    add_test_rules(rules)  # needs-approval-marker: held until an approver approves
    token = add_service_token(rules, "alice", ["agents"])
    approver = add_service_token(rules, "bob", ["agents", "approvers"])
    main_port, unreachable_port, forward_port = free_port(), free_port(), free_port()
    gateway = GatewayProcess(root / "gw", rules=rules, records=root / "records", confdir=confdir, env=gateway_env(),
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream.port}@{main_port}",
                                   "--mode", f"reverse:http://127.0.0.1:{unreachable.port}@{unreachable_port}",
                                   "--mode", f"regular@{forward_port}",
                                   "--set", f"ssl_verify_upstream_trusted_ca={tls_files.ca_cert}",
                                   "--set", "approval_admin_listen=127.0.0.1:0",
                                   "--set", f"gateway_upstream_connect_timeout_ms={TIMEOUT * 1000:.0f}",
                                   "--set", f"gateway_upstream_first_byte_timeout_ms={TIMEOUT * 1000:.0f}",
                                   "--set", f"gateway_upstream_idle_timeout_ms={TIMEOUT * 1000:.0f}"]).start()
    gateway.token, gateway.main_port, gateway.unreachable_port = token, main_port, unreachable_port
    gateway.forward_port, gateway.tls_upstream_port = forward_port, tls_upstream.port
    gateway.admin = AdminClient(admin_url(gateway), approver)
    yield gateway
    gateway.stop()


def _client(gateway, port: int | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port or gateway.main_port}/v1", api_key=gateway.token,
                         max_retries=0, timeout=30)


def _forward_client(gateway) -> openai.OpenAI:
    """An SDK client in forward mode: the gateway as its HTTPS proxy, trusting the gateway's CA."""
    proxied = httpx.Client(proxy=f"http://127.0.0.1:{gateway.forward_port}",
                           verify=ssl.create_default_context(cafile=str(gateway.confdir / "mitmproxy-ca-cert.pem")))
    return openai.OpenAI(base_url=f"https://localhost:{gateway.tls_upstream_port}/v1", api_key=gateway.token,
                         max_retries=0, timeout=30, http_client=proxied)


def wait_for_flow(records, predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = [f for f in read_flows(records) if predicate(f)]
        except FlowReadException:  # the writer is in the middle of a flow
            found = []
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{len(found)} matching flows"
            return found[0]
        time.sleep(0.05)


def _asked_for(model: str):
    return lambda f: f.request.raw_content and f'"model":"{model}"'.encode() in f.request.raw_content.replace(b" ", b"")


class AnotherCaller(threading.Thread):
    """One ordinary request from another caller, started while the test's request waits on its upstream."""

    def __init__(self, gateway) -> None:
        super().__init__(daemon=True)
        self.client, self.took, self.text = _client(gateway), None, None

    def run(self) -> None:
        time.sleep(0.3)
        started = time.monotonic()
        self.text = self.client.responses.create(model="gpt-test", input="hello meanwhile").output_text
        self.took = time.monotonic() - started


@pytest.mark.parametrize("model", ["silent", "stall-after-headers"])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_an_upstream_that_does_not_answer_gets_a_504_and_another_caller_is_served_meanwhile(gateway, mode, model):
    client = _client(gateway) if mode == "reverse" else _forward_client(gateway)
    client.responses.create(model="gpt-test", input="warm up")
    other = AnotherCaller(gateway)
    other.start()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as timed_out:
        client.responses.create(model=model, input="hello")
    took = time.monotonic() - started
    other.join(10)
    assert timed_out.value.status_code == 504
    assert timed_out.value.code == "gateway_upstream_timeout"
    assert timed_out.value.response.headers["x-should-retry"] == "false"
    assert TIMEOUT <= took < TIMEOUT + 2 * TICK + 1.0
    assert other.text and other.took < 1.0
    # The same client goes on: the timed-out connection was closed, a new one is opened.
    assert client.responses.create(model="gpt-test", input="after the timeout").output_text
    flow = wait_for_flow(gateway.records, lambda f: _asked_for(model)(f) and (f.request.scheme == "https") == (
        mode == "forward"))
    assert REFUSAL.read(flow.metadata)["code"] == "gateway_upstream_timeout"
    if mode == "reverse":  # the refusal went through the response hooks, as a reply
        assert flow.response.status_code == 504
    else:  # through mitmproxy's error path, as the flow's error
        assert "the upstream sent" in flow.error.msg


def test_an_event_stream_that_stalls_ends_with_an_sse_error_event(gateway):
    started = time.monotonic()
    events = []
    with pytest.raises(openai.APIError) as timed_out:
        for event in _client(gateway).responses.create(model="sse-stall", input="hello", stream=True):
            events.append(event.type)
    took = time.monotonic() - started
    assert events == ["response.created", "response.in_progress"]
    assert timed_out.value.code == "gateway_upstream_timeout"
    assert TIMEOUT <= took < TIMEOUT + 2 * TICK + 1.0
    flow = wait_for_flow(gateway.records, lambda f: _asked_for("sse-stall")(f) and f.request.scheme == "http")
    assert REFUSAL.read(flow.metadata)["code"] == "gateway_upstream_timeout"
    assert b"gateway_upstream_timeout" in flow.response.raw_content  # what the client got, recorded


def test_an_event_stream_that_stalls_in_a_tunnel_is_cut_not_left_hanging(gateway):
    # Inside a CONNECT tunnel no event can be added to the stream: it is cut, and the SDK raises at once.
    started = time.monotonic()
    events = []
    with pytest.raises(openai.APIConnectionError):
        for event in _forward_client(gateway).responses.create(model="sse-stall", input="hello", stream=True):
            events.append(event.type)
    assert events == ["response.created", "response.in_progress"]
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 2 * TICK + 1.0
    flow = wait_for_flow(gateway.records, lambda f: _asked_for("sse-stall")(f) and f.request.scheme == "https")
    assert REFUSAL.read(flow.metadata)["code"] == "gateway_upstream_timeout"


def test_an_upstream_whose_connect_never_completes_gets_a_504(gateway, unreachable):
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as timed_out:
        _client(gateway, gateway.unreachable_port).responses.create(model="gpt-test", input="hello")
    took = time.monotonic() - started
    assert timed_out.value.status_code == 504
    assert timed_out.value.code == "gateway_upstream_timeout"
    assert "could not connect" in timed_out.value.message
    assert TIMEOUT <= took < TIMEOUT + 2 * TICK + 1.0
    flow = wait_for_flow(gateway.records, lambda f: f.request.port == unreachable.port)
    assert REFUSAL.read(flow.metadata)["code"] == "gateway_upstream_timeout"


def test_time_held_for_approval_does_not_count_towards_the_first_byte_timeout(gateway):
    answer = {}

    def held_request():
        answer["text"] = _client(gateway).responses.create(model="gpt-test",
                                                           input="needs-approval-marker: deploy").output_text

    caller = threading.Thread(target=held_request, daemon=True)
    caller.start()
    [held] = gateway.admin.wait_pending()
    time.sleep(3 * TIMEOUT)  # held three times as long as the upstream may take to answer
    status, _ = gateway.admin.approve(held["id"])
    assert status == 200
    caller.join(10)
    assert answer.get("text")  # the upstream's answer, not a 504
