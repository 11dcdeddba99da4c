"""The upstream key never comes back: not in a reply's headers, a redirect, a body or a stream, not in a
record, and not in mitmweb while a request is in flight.

One mitmweb runs the bundle with two reverse modes: one to an HTTP/1 upstream holding an ``sk-`` key
(sent as ``Authorization: Bearer``), one to an HTTP/2 upstream over TLS holding an Azure-style key (bare
hex, sent as ``api-key``). Each upstream (``tests/key_echo_upstream.py``) hands back whatever key it
received, in every place a reply can carry it. The callers are the real openai SDK (and httpx for a
redirect the SDK would follow).
"""

from __future__ import annotations

import re
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from auditgate.identity.service_tokens import add_service_token
from auditgate.routing.key_on_wire import PLACEHOLDER
from tests.conftest import gateway_env, make_rules
from tests.fake_openai import split_text
from tests.gateway_process import BIN, GatewayProcess
from tests.key_echo_upstream import Http1EchoUpstream, Http2EchoUpstream
from tests.records import files_containing, wait_for_flows
from tests.tls_material import make_tls_files

pytestmark = pytest.mark.e2e

SK_KEY = "sk-proj-" + secrets.token_urlsafe(30)
AZURE_KEY = secrets.token_hex(16)  # Azure OpenAI keys: 32 hex digits, no prefix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Mitmweb(GatewayProcess):
    def __init__(self, *args, web_port: int, web_password: str, **kw) -> None:
        super().__init__(*args, **kw)
        self.web_port, self.web_password = web_port, web_password

    def command(self) -> list[str]:
        command = super().command()
        command[0] = str(BIN / "mitmweb")
        return command + ["--set", "web_open_browser=false", "--set", "web_host=127.0.0.1",
                          "--set", f"web_port={self.web_port}", "--set", f"web_password={self.web_password}"]

    def listening(self) -> dict[str, int]:
        return {target: int(port) for target, port in
                re.findall(r"reverse proxy to (\S+) listening at 127\.0\.0\.1:(\d+)", self.log())}


@dataclass
class Side:
    """One reverse mode of the gateway: its upstream, the key it holds for it, how a caller reaches it."""

    name: str
    key: str
    key_header: str
    upstream: object
    base_url: str
    http_client: httpx.Client | None

    def client(self, token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=token, max_retries=0, http_client=self.http_client)


@dataclass
class EchoGateway:
    gateway: _Mitmweb
    sides: dict[str, Side]
    token: str
    root: Path

    @property
    def records(self) -> Path:
        return self.gateway.records


@pytest.fixture(scope="module")
def echo_gateway(tmp_path_factory, confdir):
    root = tmp_path_factory.mktemp("key-custody")
    tls = make_tls_files(root / "tls")
    h1 = Http1EchoUpstream().start()
    h2 = Http2EchoUpstream(str(tls.server_cert), str(tls.server_key)).start()
    rules = make_rules(root / "rules", upstreams=[
        {"host": "127.0.0.1", "port": h1.port, "key_env": "KEY_SK"},
        {"host": "localhost", "port": h2.port, "key_env": "KEY_AZURE", "key_header": "api-key"},
    ])
    token = add_service_token(rules, "alice", ["agents"])
    env = {**gateway_env(), "KEY_SK": SK_KEY, "KEY_AZURE": AZURE_KEY}
    gateway = _Mitmweb(root / "gw", rules=rules, records=root / "records", confdir=confdir, env=env,
                       web_port=_free_port(), web_password=secrets.token_hex(16),
                       args=["--mode", f"reverse:http://127.0.0.1:{h1.port}@{_free_port()}",
                             "--mode", f"reverse:https://localhost:{h2.port}@{_free_port()}",
                             "--set", f"ssl_verify_upstream_trusted_ca={tls.ca_cert}",
                             "--set", "approval_admin_listen=127.0.0.1:0"]).start()
    deadline = time.monotonic() + 10
    while len(gateway.listening()) < 2:
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.05)
    ports = gateway.listening()
    # The HTTP/2 side: the caller speaks TLS to the gateway (its CA), offering h2, as the SDK does with http2=True.
    tls_client = httpx.Client(http2=True, verify=ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem")),
                              timeout=30)
    sides = {
        "sk-key-http1": Side("sk-key-http1", SK_KEY, "authorization", h1,
                             f"http://127.0.0.1:{ports[f'http://127.0.0.1:{h1.port}']}/v1", None),
        "azure-key-http2": Side("azure-key-http2", AZURE_KEY, "api-key", h2,
                                f"https://localhost:{ports[f'https://localhost:{h2.port}']}/v1", tls_client),
    }
    yield EchoGateway(gateway, sides, token, root)
    gateway.stop()
    tls_client.close()
    h1.stop()
    h2.stop()


@pytest.fixture(params=["sk-key-http1", "azure-key-http2"])
def side(request, echo_gateway) -> Side:
    return echo_gateway.sides[request.param]


def _assert_key_nowhere(echo_gateway: EchoGateway, side: Side, marker: str) -> None:
    """Once the flow carrying ``marker`` is recorded: no file of the gateway holds the key, nor its log."""
    assert wait_for_flows(echo_gateway.records, lambda f: marker.encode() in (f.request.content or b"")), \
        "the flow was not recorded"
    assert files_containing(echo_gateway.records, [side.key]) == []
    assert side.key not in echo_gateway.gateway.log()


def _received_key(side: Side) -> str:
    """The upstream got the real key (so the placeholder became the key on the wire), and no caller token."""
    request = side.upstream.behaviour.received[-1]
    value = request.headers.get(side.key_header, "")
    assert value.removeprefix("Bearer ") == side.key, request.headers
    assert PLACEHOLDER not in str(request.headers)
    return value


def test_a_key_echoed_in_reply_headers_and_body_reaches_neither_caller_nor_record(echo_gateway, side):
    marker = f"echo-headers {secrets.token_hex(4)}"
    raw = side.client(echo_gateway.token).responses.with_raw_response.create(model="gpt-test", input=marker)
    _received_key(side)
    headers = dict(raw.headers)
    # The upstream echoed it in x-request-id, x-echo-authorization and openai-organization, and in the text.
    assert {"x-request-id", "x-echo-authorization", "openai-organization"} <= set(headers)
    assert side.key not in str(headers)
    assert headers["x-echo-authorization"].startswith("Bearer [upstream-key-removed]")
    text = raw.parse().output_text
    assert text.startswith("Hello. The key you sent is [upstream-key-removed]") and side.key not in text
    if side.name.endswith("http2"):
        assert side.upstream.alpn and set(side.upstream.alpn) == {"h2"}  # the upstream really spoke HTTP/2
    _assert_key_nowhere(echo_gateway, side, marker)


def test_a_key_in_a_redirect_location_is_removed(echo_gateway, side):
    marker = f"redirect {secrets.token_hex(4)}"
    client = side.http_client or httpx.Client(timeout=30)
    response = client.post(f"{side.base_url}/responses", json={"model": "gpt-test", "input": marker},
                           headers={"authorization": f"Bearer {echo_gateway.token}"}, follow_redirects=False)
    _received_key(side)
    assert response.status_code == 302
    location = response.headers["location"]
    assert side.key not in location and "k=[upstream-key-removed]" in location and location.endswith("&state=1")
    _assert_key_nowhere(echo_gateway, side, marker)


def test_a_key_spelled_over_stream_deltas_is_removed_from_the_stream_and_its_record(echo_gateway, side):
    text = f"Your key is {side.key} - keep it safe."
    pieces = split_text(text, side.upstream.behaviour.fake.deltas)
    assert not any(side.key in piece for piece in pieces), "the upstream must split the key over several deltas"
    marker = f"stream {secrets.token_hex(4)}"
    stream = side.client(echo_gateway.token).responses.create(model="gpt-test", input=marker, stream=True)
    deltas, events = [], []
    for event in stream:
        events.append(event.model_dump_json())
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            final = event.response.output_text
    _received_key(side)
    joined = "".join(deltas)
    # Masking knows an sk- key as a secret and replaces it first (<API_KEY>); a bare hex key only key custody finds.
    expected = "<API_KEY>" if side.key.startswith("sk-") else "[upstream-key-removed]"
    assert joined.startswith(f"Your key is {expected}") and joined.endswith("- keep it safe."), joined
    assert side.key not in joined and side.key not in final
    assert not any(side.key in e for e in events)
    _assert_key_nowhere(echo_gateway, side, marker)


def test_a_compressed_reply_is_scrubbed_once_decoded(echo_gateway, side):
    """An upstream that compresses whatever the gateway asked for: the key is found in the decoded reply."""
    client = side.client(echo_gateway.token)
    marker = f"gzip echo-headers {secrets.token_hex(4)}"
    text = client.responses.create(model="gpt-test", input=marker).output_text
    assert text.startswith("Hello. The key you sent is ") and side.key not in text
    assert side.upstream.behaviour.received[-1].headers["accept-encoding"] == "identity"  # what the gateway asked
    deltas = [e.delta for e in client.responses.create(model="gpt-test", input=f"gzip {marker}", stream=True)
              if e.type == "response.output_text.delta"]
    assert "".join(deltas).endswith("- keep it safe.") and side.key not in "".join(deltas)
    _assert_key_nowhere(echo_gateway, side, marker)


def test_mitmweb_never_shows_the_key_of_a_request_in_flight(echo_gateway, side):
    behaviour = side.upstream.behaviour
    behaviour.arrived.clear()
    behaviour.released.clear()
    marker = f"slow {secrets.token_hex(4)}"
    out: dict = {}

    def call() -> None:
        try:
            out["result"] = side.client(echo_gateway.token).responses.create(model="gpt-test", input=marker)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    try:
        assert behaviour.arrived.wait(20), "the request never reached the upstream"
        # The upstream holds the request now: the key has left on the wire; the flow waits for its reply.
        assert _received_key(side)
        web = httpx.Client(base_url=f"http://127.0.0.1:{echo_gateway.gateway.web_port}",
                           headers={"authorization": f"Bearer {echo_gateway.gateway.web_password}"}, timeout=10)
        listing = web.get("/flows")
        assert listing.status_code == 200
        in_flight = [f for f in listing.json() if f["request"]["path"] == "/v1/responses" and f.get("response") is None
                     and marker.encode() in web.get(f"/flows/{f['id']}/request/content.data").content]
        assert len(in_flight) == 1, listing.text
        shown = {name.lower(): value for name, value in in_flight[0]["request"]["headers"]}
        # The flow carries the placeholder where the key goes on the wire, and nothing of the key.
        assert PLACEHOLDER in shown[side.key_header]
        assert side.key not in listing.text
        dump = web.get("/flows/dump")  # every flow, serialized: what "Save" in mitmweb's menu downloads
        assert dump.status_code == 200 and dump.content and side.key.encode() not in dump.content
    finally:
        behaviour.release()
    thread.join(30)
    assert "error" not in out, out
    assert side.key not in out["result"].output_text
    # Answered now (the upstream quoted the key in its reply): mitmweb shows the reply without it either.
    assert side.key.encode() not in web.get("/flows/dump").content
    _assert_key_nowhere(echo_gateway, side, marker)
