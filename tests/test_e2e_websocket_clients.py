"""End to end over WebSocket with the REAL clients: the Agents SDK's websocket Responses transport
(`set_default_openai_responses_transport("websocket")`, Runner.run and run_streamed), the openai SDK's
raw `responses.connect()` and `realtime.connect()` (text modality), and an `agents.realtime` session,
through a real mitmdump running the bundle in reverse and forward mode, against a local WebSocket
upstream that speaks both protocols (tests/fake_websocket_upstream.py).

What it proves (issue 13): personal data split across deltas never reaches a client raw, in no delta and
in no final text; a prompt holding a private key makes the SDK raise and never reaches the upstream,
and the session stays usable; the upstream gets the gateway's key, never the caller's token, and what it
echoes of the key is scrubbed; a message needing approval is held until a second identity grants it;
the records (flow files read back with mitmproxy's FlowReader, the audit log) hold the masked messages,
no credentials and no raw personal data, and `auditgate verify` passes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import agents
import openai
import pytest
from agents import Agent, RunConfig, Runner
from agents.realtime import RealtimeAgent, RealtimeRunner

from auditgate.audit.chain import audit_files, parse_entry_line
from auditgate.identity.service_tokens import add_service_token
from auditgate.websocket.records import messages_sha256
from tests.approval_gateway import AdminClient, add_test_rules, admin_url
from tests.conftest import UPSTREAM_KEY, gateway_env, make_rules
from tests.fake_websocket_upstream import FakeWebSocketServer, FakeWebSocketUpstream
from tests.gateway_process import ROOT, GatewayProcess
from tests.masking_fixtures import PII_VALUES
from tests.records import files_containing, read_flows

pytestmark = pytest.mark.e2e

EMAIL, PHONE = PII_VALUES["EMAIL_ADDRESS"], PII_VALUES["PHONE_NUMBER"]
# The reply, cut so each personal data value straddles two deltas.
PIECES = ["Write to jane.roe@exa", "mple.org or call +1 415-", "555-0100 today."]
MASKED = "Write to <EMAIL_ADDRESS> or call <PHONE_NUMBER> today."
# Any of these in a delta is personal data leaking out, whole or in part.
RAW_FRAGMENTS = [EMAIL, PHONE, "jane.roe", "example.org", "415-555", "555-0100"]
# Shaped so the shipped block-private-keys rule matches; not a real key.
PRIVATE_KEY = "-----BEGIN " + "PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END " + "PRIVATE KEY-----"
RUN_SECONDS = 30


def within(seconds: float, fn, *args):
    """fn(*args) in a thread, failing the test instead of hanging if the gateway never answers."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # handed to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds}s"
    if "error" in out:
        raise out["error"]
    return out["result"]


@dataclass
class Tokens:
    alice: str  # agents
    bob: str  # agents, approvers

    def all(self) -> list[str]:
        return [self.alice, self.bob]


@dataclass
class Upstreams:
    plain: FakeWebSocketServer
    tls: FakeWebSocketServer


@pytest.fixture(scope="module")
def ws_upstreams(tls_files):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files.server_cert, tls_files.server_key)
    upstreams = Upstreams(FakeWebSocketServer().start(), FakeWebSocketServer(FakeWebSocketUpstream(), context).start())
    yield upstreams
    upstreams.plain.stop()
    upstreams.tls.stop()


def _rules(directory: Path, tls_port: int) -> tuple[Path, Tokens]:
    rules = make_rules(directory, upstreams=[{"host": "localhost", "port": tls_port, "key_env": "OPENAI_API_KEY"}])
    add_test_rules(rules)  # the approval marker rule, one masking worker
    return rules, Tokens(add_service_token(rules, "alice", ["agents"]),
                         add_service_token(rules, "bob", ["agents", "approvers"]))


@pytest.fixture(scope="module")
def ws_rules(tmp_path_factory, ws_upstreams) -> tuple[Path, Tokens]:
    return _rules(tmp_path_factory.mktemp("ws-clients") / "rules", ws_upstreams.tls.port)


def _start(workdir: Path, rules: Path, confdir: Path, args: list[str]) -> GatewayProcess:
    return GatewayProcess(workdir, rules=rules, records=workdir / "records", confdir=confdir, env=gateway_env(),
                          args=["--set", "approval_admin_listen=127.0.0.1:0", *args]).start()


@pytest.fixture(scope="module")
def ws_reverse_gateway(tmp_path_factory, ws_rules, confdir, ws_upstreams):
    gateway = _start(tmp_path_factory.mktemp("ws-reverse"), ws_rules[0], confdir,
                     ["--mode", f"reverse:http://127.0.0.1:{ws_upstreams.plain.port}"])
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def ws_forward_gateway(tmp_path_factory, ws_rules, confdir, tls_files):
    gateway = _start(tmp_path_factory.mktemp("ws-forward"), ws_rules[0], confdir,
                     ["--set", f"ssl_verify_upstream_trusted_ca={tls_files.ca_cert}"])
    yield gateway
    gateway.stop()


@dataclass
class Route:
    """How an unmodified client reaches the upstream through the gateway in one mode."""

    mode: str
    gateway: GatewayProcess
    base_url: str  # what OPENAI_BASE_URL says
    fake: FakeWebSocketUpstream
    tokens: Tokens

    @property
    def realtime_url(self) -> str:
        scheme = "wss" if self.base_url.startswith("https") else "ws"
        return f"{scheme}{self.base_url[self.base_url.index(':'):]}/realtime?model=gpt-realtime"

    def client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=token or self.tokens.alice, max_retries=0)


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
               "no_proxy", "WSS_PROXY", "wss_proxy", "WS_PROXY", "ws_proxy")


def _route(mode: str, request, monkeypatch, ws_rules, ws_upstreams, confdir) -> Route:
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    tokens = ws_rules[1]
    if mode == "reverse":
        gateway = request.getfixturevalue("ws_reverse_gateway")
        fake, base_url = ws_upstreams.plain.fake, f"{gateway.url}/v1"
    else:
        gateway = request.getfixturevalue("ws_forward_gateway")
        # The websockets library (>= 15) takes the proxy from the environment like httpx does.
        monkeypatch.setenv("HTTPS_PROXY", gateway.url)
        monkeypatch.setenv("SSL_CERT_FILE", str(confdir / "mitmproxy-ca-cert.pem"))
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        fake, base_url = ws_upstreams.tls.fake, f"https://localhost:{ws_upstreams.tls.port}/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    monkeypatch.setenv("OPENAI_API_KEY", tokens.alice)
    fake.reset().pieces = list(PIECES)
    return Route(mode, gateway, base_url, fake, tokens)


@pytest.fixture(params=["reverse", "forward"])
def route(request, monkeypatch, ws_rules, ws_upstreams, confdir) -> Route:
    return _route(request.param, request, monkeypatch, ws_rules, ws_upstreams, confdir)


@pytest.fixture
def reverse_route(request, monkeypatch, ws_rules, ws_upstreams, confdir) -> Route:
    return _route("reverse", request, monkeypatch, ws_rules, ws_upstreams, confdir)


@pytest.fixture
def websocket_transport():
    """The Agents SDK's one-line switch (process-wide), put back as it was afterwards whatever happens."""
    from agents.models._openai_shared import get_default_openai_responses_transport

    before = get_default_openai_responses_transport()
    agents.set_default_openai_responses_transport("websocket")
    try:
        yield
    finally:
        agents.set_default_openai_responses_transport(before)


def _assert_key_custody(route: Route) -> None:
    assert route.fake.upgrades, "no upgrade reached the upstream"
    for upgrade in route.fake.upgrades:
        assert upgrade.headers.get("authorization") == f"Bearer {UPSTREAM_KEY}", upgrade.headers
        sent = json.dumps(upgrade.headers) + upgrade.path
        assert not [t for t in route.tokens.all() if t in sent]
    for message in route.fake.received:
        assert not [t for t in route.tokens.all() if t in message.data]


def _assert_no_raw_fragment(deltas: list[str]) -> None:
    leaks = [(d, f) for d in deltas for f in RAW_FRAGMENTS if f in d]
    assert not leaks, f"raw personal data in deltas: {leaks}"


def _agent() -> Agent:
    # A model NAME, so the default provider resolves it with the default (websocket) transport.
    return Agent(name="assistant", instructions="Answer briefly.", model="gpt-test")


async def _run(prompt: str) -> str:
    config = RunConfig(tracing_disabled=True)
    try:
        return str((await Runner.run(_agent(), prompt, run_config=config)).final_output)
    finally:
        await config.model_provider.aclose()  # closes the websocket, as an app does when done


def run_agent(prompt: str) -> str:
    return within(RUN_SECONDS, lambda: asyncio.run(_run(prompt)))


# ---- the Agents SDK, websocket transport ----------------------------------------------------------

def test_runner_run_over_websocket_returns_masked_text(route, websocket_transport):
    assert run_agent("Who do I write to?") == MASKED
    assert [m.type for m in route.fake.received] == ["response.create"]
    assert route.fake.upgrades[0].path.endswith("/v1/responses")
    _assert_key_custody(route)


async def _streamed() -> tuple[str, list[str]]:
    config = RunConfig(tracing_disabled=True)
    try:
        result = Runner.run_streamed(_agent(), "Who do I write to?", run_config=config)
        deltas = []
        async for event in result.stream_events():
            if event.type == "raw_response_event" and getattr(event.data, "type", "") == "response.output_text.delta":
                deltas.append(event.data.delta)
        return str(result.final_output), deltas
    finally:
        await config.model_provider.aclose()


def test_runner_run_streamed_masks_every_delta(route, websocket_transport):
    final, deltas = within(RUN_SECONDS, lambda: asyncio.run(_streamed()))
    assert final == MASKED
    _assert_no_raw_fragment(deltas)
    assert "".join(deltas) == MASKED and len(deltas) > 1, deltas  # streamed, not one block at the end
    _assert_key_custody(route)


def test_private_key_prompt_makes_the_runner_raise_and_never_reaches_the_upstream(reverse_route, websocket_transport):
    with pytest.raises(Exception) as raised:
        run_agent(f"Store this for me:\n{PRIVATE_KEY}")
    assert "gateway_policy_blocked" in str(raised.value), raised.value
    assert not [m for m in reverse_route.fake.received if "PRIVATE KEY" in m.data]


# ---- the openai SDK, raw connections -------------------------------------------------------------

def _responses_turn(connection, prompt: str) -> tuple[list, list[str]]:
    connection.response.create(model="gpt-test", input=prompt)
    events, deltas = [], []
    for event in connection:
        events.append(event)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "error"):
            return events, deltas
    raise AssertionError(f"the connection closed mid-response after {[e.type for e in events]}")


def test_raw_responses_connect_masks_deltas_and_final_events(route):
    def session():
        with route.client().responses.connect() as connection:
            return _responses_turn(connection, "Who do I write to?")

    events, deltas = within(RUN_SECONDS, session)
    _assert_no_raw_fragment(deltas)
    assert "".join(deltas) == MASKED
    by_type = {e.type: e for e in events}
    assert by_type["response.output_text.done"].text == MASKED
    assert by_type["response.completed"].response.output_text == MASKED
    assert by_type["response.output_item.done"].item.content[0].text == MASKED
    _assert_no_raw_fragment([e.to_json() for e in events])
    _assert_key_custody(route)


def test_blocked_event_gets_the_api_error_event_and_the_session_stays_usable(reverse_route):
    def session():
        with reverse_route.client().responses.connect() as connection:
            blocked, _ = _responses_turn(connection, f"Keep this safe:\n{PRIVATE_KEY}")
            after, deltas = _responses_turn(connection, "Who do I write to?")
            return blocked, after, deltas

    blocked, after, deltas = within(RUN_SECONDS, session)
    [error] = blocked
    assert error.type == "error" and error.error.code == "gateway_policy_blocked", error
    assert error.error.type == "invalid_request_error"
    assert after[-1].type == "response.completed" and "".join(deltas) == MASKED
    # Only the allowed event reached the upstream.
    assert [json.loads(m.data)["input"] for m in reverse_route.fake.received] == ["Who do I write to?"]


def test_upstream_echo_of_the_key_is_scrubbed(reverse_route):
    reverse_route.fake.echo_authorization = True

    def session():
        with reverse_route.client().responses.connect() as connection:
            return _responses_turn(connection, "Who do I write to?")

    events, deltas = within(RUN_SECONDS, session)
    assert events[-1].type == "response.completed"
    seen = "".join(e.to_json() for e in events)
    assert UPSTREAM_KEY not in seen and UPSTREAM_KEY[-12:] not in seen
    assert "Upstream saw:" in "".join(deltas)
    _assert_key_custody(reverse_route)  # and the upstream did get the gateway's key


def _realtime_turn(connection, text: str) -> tuple[list, list[str]]:
    connection.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    connection.response.create()
    events, deltas = [], []
    for event in connection:
        events.append(event)
        if event.type in ("response.output_text.delta", "response.output_audio_transcript.delta"):
            deltas.append(event.delta)
        if event.type in ("response.done", "error"):
            return events, deltas
    raise AssertionError(f"the connection closed mid-response after {[e.type for e in events]}")


def test_realtime_connect_text_modality_masks_deltas_and_done(route):
    def session():
        with route.client().realtime.connect(model="gpt-realtime") as connection:
            connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            return _realtime_turn(connection, "Who do I write to?")

    events, deltas = within(RUN_SECONDS, session)
    _assert_no_raw_fragment(deltas)
    assert "".join(deltas) == MASKED
    by_type = {e.type: e for e in events}
    assert by_type["response.output_text.done"].text == MASKED
    assert by_type["response.done"].response.output[0].content[0].text == MASKED
    _assert_no_raw_fragment([e.to_json() for e in events])
    assert [m.type for m in route.fake.received] == ["session.update", "conversation.item.create", "response.create"]
    assert "/v1/realtime" in route.fake.upgrades[0].path
    _assert_key_custody(route)


def test_realtime_audio_transcripts_are_masked(reverse_route):
    reverse_route.fake.input_transcript = f"My mail is {EMAIL}."

    def session():
        with reverse_route.client().realtime.connect(model="gpt-realtime") as connection:
            connection.input_audio_buffer.append(audio="AAAAAAAA")
            connection.input_audio_buffer.commit()
            heard = next(e for e in connection if e.type == "conversation.item.input_audio_transcription.completed")
            events, deltas = _realtime_turn(connection, "Who do I write to?")
            return heard, events, deltas

    heard, events, deltas = within(RUN_SECONDS, session)
    assert heard.transcript == "My mail is <EMAIL_ADDRESS>."
    _assert_no_raw_fragment(deltas)
    assert "".join(deltas) == MASKED
    assert next(e for e in events if e.type == "response.output_audio_transcript.done").transcript == MASKED


def test_realtime_blocked_item_is_answered_with_an_error_event_and_never_reaches_the_upstream(reverse_route):
    def session():
        with reverse_route.client().realtime.connect(model="gpt-realtime") as connection:
            connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            connection.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": f"Keep this:\n{PRIVATE_KEY}"}]})
            error = next(e for e in connection if e.type == "error")
            return error, _realtime_turn(connection, "Who do I write to?")

    error, (events, deltas) = within(RUN_SECONDS, session)
    assert error.error.code == "gateway_policy_blocked", error
    assert events[-1].type == "response.done" and "".join(deltas) == MASKED  # the session went on
    assert not [m for m in reverse_route.fake.received if "PRIVATE KEY" in m.data]


# ---- the Agents SDK's realtime agents --------------------------------------------------------------

async def _realtime_agent_session(route: Route) -> tuple[list[str], list]:
    agent = RealtimeAgent(name="voice", instructions="Answer briefly.")
    runner = RealtimeRunner(agent, config={"model_settings": {"model_name": "gpt-realtime",
                                                              "output_modalities": ["text"]}})
    # agents.realtime does not read OPENAI_BASE_URL: the URL is given, as an app behind a gateway does.
    session = await runner.run(model_config={"url": route.realtime_url, "api_key": route.tokens.alice})
    deltas, errors, history = [], [], []
    async with session:
        await session.send_message("Who do I write to?")
        async for event in session:
            if event.type == "raw_model_event" and event.data.type == "output_text_delta":
                deltas.append(event.data.delta)
            elif event.type == "error":
                errors.append(event)
            elif event.type == "history_updated":
                history = list(event.history)
            elif event.type == "agent_end":
                break
    assert not errors, errors
    return deltas, history


def test_agents_realtime_session_is_masked(route):
    deltas, history = within(RUN_SECONDS, lambda: asyncio.run(_realtime_agent_session(route)))
    _assert_no_raw_fragment(deltas)
    assert "".join(deltas) == MASKED
    [answer] = [item for item in history if getattr(item, "role", None) == "assistant"]
    assert [getattr(c, "text", None) for c in answer.content] == [MASKED]
    _assert_key_custody(route)


# ---- approval held for one message ---------------------------------------------------------------

def test_a_message_needing_approval_is_held_until_a_second_identity_grants_it(reverse_route):
    gateway, tokens, fake = reverse_route.gateway, reverse_route.tokens, reverse_route.fake
    out: dict = {}

    def session():
        try:
            with reverse_route.client(tokens.alice).responses.connect() as connection:
                out["events"], out["deltas"] = _responses_turn(connection, "ws-held-e2e needs-approval-marker")
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=session, daemon=True)
    thread.start()
    bob, alice = AdminClient(admin_url(gateway), tokens.bob), AdminClient(admin_url(gateway), tokens.alice)
    [pending] = bob.wait_pending(lambda a: "ws-held-e2e" in a["preview"])
    assert fake.upgrades and not fake.received, "the held message reached the upstream before approval"
    assert "events" not in out
    status, body = alice.approve(pending["id"])
    assert (status, body["error"]["code"]) == (403, "self_approval_refused")
    status, body = bob.approve(pending["id"], reason="fine")
    assert status == 200 and body["status"] == "approved"
    thread.join(RUN_SECONDS)
    assert "error" not in out, out.get("error")
    assert out["events"][-1].type == "response.completed" and "".join(out["deltas"]) == MASKED
    assert [json.loads(m.data)["input"] for m in fake.received] == ["ws-held-e2e needs-approval-marker"]
    _assert_key_custody(reverse_route)


# ---- what the gateway wrote -----------------------------------------------------------------------

def _audit_entries(records: Path) -> list[dict]:
    return [parse_entry_line(line) for path in audit_files(records / "audit") for line in path.read_bytes().splitlines()
            if line.strip()]


def test_records_hold_the_masked_messages_no_secrets_and_verify(tmp_path, confdir, ws_upstreams, websocket_transport,
                                                                 monkeypatch):
    """Its own gateway, stopped before the records are read: the audit log is sealed, everything flushed."""
    rules, tokens = _rules(tmp_path / "rules", ws_upstreams.tls.port)
    gateway = _start(tmp_path / "gw", rules, confdir, ["--mode", f"reverse:http://127.0.0.1:{ws_upstreams.plain.port}"])
    fake = ws_upstreams.plain.fake
    fake.reset().pieces = list(PIECES)
    fake.echo_authorization = True
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", f"{gateway.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", tokens.alice)
    route = Route("reverse", gateway, f"{gateway.url}/v1", fake, tokens)
    try:
        assert run_agent("Who do I write to?").startswith(MASKED)

        def realtime():
            with route.client().realtime.connect(model="gpt-realtime") as connection:
                connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
                connection.conversation.item.create(item={"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": f"Keep this:\n{PRIVATE_KEY}"}]})
                assert next(e for e in connection if e.type == "error").error.code == "gateway_policy_blocked"
                return _realtime_turn(connection, "Who do I write to?")

        within(RUN_SECONDS, realtime)
    finally:
        gateway.stop()
    records = tmp_path / "gw" / "records"

    # Every file the gateway wrote (records and its log): no key, no token, no raw personal data.
    needles = [UPSTREAM_KEY, *tokens.all(), EMAIL, PHONE, "jane.roe@exa", "555-0100"]
    assert not files_containing(tmp_path / "gw", needles)

    # The flow files, read back with mitmproxy's FlowReader, hold both sessions with their masked messages.
    sessions = [f for f in read_flows(records) if f.websocket is not None]
    assert sorted(f.request.path.split("?")[0] for f in sessions) == ["/v1/realtime", "/v1/responses"]
    for flow in sessions:
        texts = [m.text for m in flow.websocket.messages]
        assert any(m.from_client for m in flow.websocket.messages) and any(not m.from_client for m in flow.websocket.messages)
        assert any("<EMAIL_ADDRESS>" in t for t in texts), texts

    # The audit log has the sessions and their responses, chained and signed: `auditgate verify` passes.
    entries = _audit_entries(records)
    kinds = [e["kind"] for e in entries]
    assert kinds.count("websocket_session") == 2 and kinds.count("websocket_response") >= 2, kinds
    session_entries = {e["flow_id"]: e for e in entries if e["kind"] == "websocket_session"}
    assert set(session_entries) == {f.id for f in sessions}
    assert set(session_entries) <= {e.get("flow_id") for e in entries if e["kind"] == "flow"}
    for flow in sessions:  # the entry's digest is over the messages as the flow file holds them
        assert session_entries[flow.id]["messages_sha256"] == messages_sha256(flow.websocket.messages)
    [blocked] = [e for e in entries if e["kind"] == "websocket_event" and e.get("blocked")]
    assert blocked["policy"]["rule"] == "block-private-keys" and blocked["event_type"] == "conversation.item.create"
    verified = subprocess.run([sys.executable, "-m", "auditgate", "verify", str(records)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and "VERIFIED" in verified.stdout, verified.stdout + verified.stderr


def test_a_session_still_open_when_the_gateway_stops_is_recorded(tmp_path, confdir, ws_upstreams, monkeypatch):
    """An app that never closes its socket (the Agents SDK keeps one open between runs): what passed is
    still in the flow file and the audit log when the gateway shuts down, and the records verify."""
    rules, tokens = _rules(tmp_path / "rules", ws_upstreams.tls.port)
    gateway = _start(tmp_path / "gw", rules, confdir, ["--mode", f"reverse:http://127.0.0.1:{ws_upstreams.plain.port}"])
    fake = ws_upstreams.plain.fake
    fake.reset().pieces = list(PIECES)
    connection = None
    try:
        connection = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=tokens.alice, max_retries=0) \
            .responses.connect().enter()
        events, _ = within(RUN_SECONDS, _responses_turn, connection, "Who do I write to?")
        assert events[-1].type == "response.completed"
    finally:
        gateway.stop()  # the session is still open
        if connection is not None:
            connection.close()
    records = tmp_path / "gw" / "records"
    assert not files_containing(tmp_path / "gw", [UPSTREAM_KEY, *tokens.all(), EMAIL, PHONE, "jane.roe@exa"])
    [flow] = [f for f in read_flows(records) if f.websocket is not None]
    assert any("<EMAIL_ADDRESS>" in m.text for m in flow.websocket.messages)
    assert flow.id in {e["flow_id"] for e in _audit_entries(records) if e["kind"] == "websocket_session"}
    verified = subprocess.run([sys.executable, "-m", "auditgate", "verify", str(records)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and "VERIFIED" in verified.stdout, verified.stdout + verified.stderr
