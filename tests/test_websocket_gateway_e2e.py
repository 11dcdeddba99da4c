"""The gateway governs WebSocket sessions message by message: a raw ``websockets`` client through a real
mitmdump (reverse mode, and forward mode over HTTPS_PROXY) against a minimal local WebSocket upstream
written with the ``websockets`` library (below), speaking the Responses API's WebSocket mode and the
Realtime API. The real-SDK tests are in tests/test_e2e_websocket_*.py."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from auditgate.core.flow_contract import REFUSAL, WEBSOCKET
from auditgate.identity.service_tokens import add_service_token
from auditgate.websocket.records import messages_sha256
from tests.approval_gateway import AdminClient, add_test_rules, admin_url
from tests.conftest import UPSTREAM_KEY, gateway_env
from tests.gateway_process import GatewayProcess
from tests.records import files_containing, wait_for_flows
from tests.websocket_sessions import (
    ThreadedWebSocketServer,
    WebSocketSetup,
    ca_confdir,
    events_of,
    events_until,
    open_session,
    start_reverse_gateway,
    websocket_rules,
)

pytestmark = pytest.mark.e2e

PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\n-----END RSA PRIVATE KEY-----"
EMAIL = "jane.doe@example.com"

AUDIO = base64.b64encode(bytes(range(256)) * 8).decode()


class WebSocketUpstream(ThreadedWebSocketServer):
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_context)
        self.reply_deltas: list[str] = ["Hello", " there"]
        self.upgrades: list[dict] = []  # the upgrade request's headers, lower-cased
        self.received: list[dict] = []  # every client event, parsed

    def reset(self) -> None:
        self.reply_deltas = ["Hello", " there"]
        self.upgrades.clear()
        self.received.clear()

    async def _session(self, connection) -> None:
        request = connection.request
        self.upgrades.append({k.lower(): v for k, v in request.headers.raw_items()} | {":path": request.path})
        realtime = request.path.split("?")[0].endswith("/realtime")
        if realtime:
            await connection.send(json.dumps({"type": "session.created", "event_id": "ev_0",
                                              "session": {"id": "sess_1", "instructions": ""}}))
        n = 0
        async for raw in connection:
            event = json.loads(raw)
            self.received.append(event)
            if event.get("type") != "response.create":
                continue
            n += 1
            if realtime:
                await self._realtime_response(connection, f"resp_{n}")
            else:
                await self._responses_response(connection, f"resp_{n}")

    async def _responses_response(self, connection, rid: str) -> None:
        seq = iter(range(1000))
        item = f"msg_{rid}"
        text = "".join(self.reply_deltas)
        send = connection.send
        await send(json.dumps({"type": "response.created", "sequence_number": next(seq),
                               "response": {"id": rid, "object": "response", "status": "in_progress", "output": []}}))
        for delta in self.reply_deltas:
            await send(json.dumps({"type": "response.output_text.delta", "sequence_number": next(seq),
                                   "item_id": item, "output_index": 0, "content_index": 0, "delta": delta}))
        await send(json.dumps({"type": "response.output_text.done", "sequence_number": next(seq), "item_id": item,
                               "output_index": 0, "content_index": 0, "text": text}))
        message = {"id": item, "type": "message", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        await send(json.dumps({"type": "response.output_item.done", "sequence_number": next(seq),
                               "output_index": 0, "item": message}))
        await send(json.dumps({"type": "response.completed", "sequence_number": next(seq),
                               "response": {"id": rid, "object": "response", "status": "completed",
                                            "output": [message]}}))

    async def _realtime_response(self, connection, rid: str) -> None:
        item = f"item_{rid}"
        text = "".join(self.reply_deltas)
        send = connection.send
        await send(json.dumps({"type": "response.created", "event_id": "ev_1",
                               "response": {"id": rid, "object": "realtime.response", "status": "in_progress"}}))
        await send(json.dumps({"type": "response.output_audio.delta", "event_id": "ev_2", "response_id": rid,
                               "item_id": item, "output_index": 0, "content_index": 0, "delta": AUDIO}))
        for delta in self.reply_deltas:
            await send(json.dumps({"type": "response.output_audio_transcript.delta", "event_id": "ev_3",
                                   "response_id": rid, "item_id": item, "output_index": 0, "content_index": 0,
                                   "delta": delta}))
        await send(json.dumps({"type": "response.output_audio_transcript.done", "event_id": "ev_4",
                               "response_id": rid, "item_id": item, "output_index": 0, "content_index": 0,
                               "transcript": text}))
        await send(json.dumps({"type": "response.done", "event_id": "ev_5", "response": {
            "id": rid, "object": "realtime.response", "status": "completed",
            "output": [{"id": item, "type": "message", "role": "assistant",
                        "content": [{"type": "output_audio", "transcript": text}]}]}}))


# A test-only mitmproxy script loaded after the bundle: an upgrade carrying x-test-ws-fault: <addon>.<hook>
# makes that hook of that bundle addon raise on every WebSocket message ("=skip": return doing nothing).
FAULT_ADDON = '''
import inspect
from mitmproxy import ctx
from mitmproxy.addonmanager import traverse

HOOKS = ("websocket_message",)


def _wrap(original, name):
    async def hook(self, flow):
        fault = flow.metadata.get("test.fault", "")
        if fault == name:
            raise RuntimeError("injected fault")
        if fault == name + "=skip":
            return None
        result = original(self, flow)
        if inspect.isawaitable(result):
            await result
    return hook


class WebSocketFaults:
    def requestheaders(self, flow):
        # Read before key custody drops the header (it forwards only the SDKs' own headers).
        flow.metadata["test.fault"] = flow.request.headers.get("x-test-ws-fault", "")

    def running(self):
        for addon in traverse(ctx.master.addons.chain):
            module = type(addon).__module__
            if not module.startswith("auditgate_addons."):
                continue
            for hook in HOOKS:
                original = getattr(type(addon), hook, None)
                if original is not None:
                    setattr(type(addon), hook, _wrap(original, module.rpartition(".")[2] + "." + hook))


addons = [WebSocketFaults()]
'''


@dataclass
class Setup(WebSocketSetup):
    bob: str
    admin: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws-gateway")
    upstream = WebSocketUpstream().start()
    rules = websocket_rules(root / "rules", upstream.port)
    add_test_rules(rules)
    alice = add_service_token(rules, "alice", ["agents"])
    bob = add_service_token(rules, "bob", ["agents", "approvers"])
    (root / "fault_addon.py").write_text(FAULT_ADDON)
    gateway = start_reverse_gateway(root, rules, upstream.port, root / "records",
                                    ["--set", "approval_admin_listen=127.0.0.1:0", "-s", str(root / "fault_addon.py")])
    try:
        yield Setup(gateway, upstream, rules, root / "records", alice, bob, admin_url(gateway))
    finally:
        gateway.stop()
        upstream.stop()


@pytest.fixture
def ws(setup):
    setup.upstream.reset()
    return setup


def websocket_flows(records: Path, count: int = 1, predicate=lambda f: True):
    return wait_for_flows(records, lambda f: f.websocket is not None and predicate(f), count=count)


def test_a_responses_session_masks_pii_split_across_deltas_and_is_recorded_masked(ws):
    ws.upstream.reply_deltas = ["Write to jane.doe@exa", "mple.com today", "."]
    with open_session(ws) as connection:
        connection.send(json.dumps({"type": "response.create", "model": "gpt-test", "input": "who do I write to?"}))
        events = events_until(connection, {"response.completed", "error"})
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    done = next(e for e in events if e["type"] == "response.output_text.done")["text"]
    completed = next(e for e in events if e["type"] == "response.completed")
    assert EMAIL not in json.dumps(events) and "jane.doe" not in "".join(deltas), events
    # The held tail came as a last delta before the .done: the deltas add up to the final text, none empty.
    assert done == "Write to <EMAIL_ADDRESS> today." == "".join(deltas) and "" not in deltas, deltas
    assert completed["response"]["output"][0]["content"][0]["text"] == done
    # In the upstream's order (the events the gateway sent itself did not overtake or fall behind others).
    types = [e["type"] for e in events]
    assert types == ["response.created", *["response.output_text.delta"] * len(deltas), "response.output_text.done",
                     "response.output_item.done", "response.completed"], types
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    # The key went to the upstream on the upgrade, never the caller's token.
    upgrade = ws.upstream.upgrades[-1]
    assert upgrade["authorization"] == f"Bearer {UPSTREAM_KEY}" and ws.alice not in json.dumps(upgrade)
    [flow] = websocket_flows(ws.records, predicate=lambda f: any(b"who do I write to" in m.content
                                                                  for m in f.websocket.messages))
    assert flow.websocket.messages and not any(EMAIL.encode() in m.content for m in flow.websocket.messages)
    # The record holds what the client got: the server messages passed on are the events received, and one the
    # gateway sent again in its place keeps its place, dropped, without its content.
    passed = [json.loads(m.content) for m in flow.websocket.messages if not m.from_client and not m.dropped]
    assert passed == events
    assert all(m.content == b'{"omitted":"not passed on"}' for m in flow.websocket.messages
               if not m.from_client and m.dropped)
    assert WEBSOCKET.get(flow)["masked"] >= 1
    [session] = events_of(ws.records, "websocket_session", flow.id)
    fields = session.get("fields", session)
    assert fields["messages_sha256"] == messages_sha256(flow.websocket.messages)
    assert fields["messages_from_client"] == 1 and fields["messages_from_server"] == len(events)
    [response] = events_of(ws.records, "websocket_response", flow.id)
    assert (response.get("fields", response))["masking"]["findings"] == {"EMAIL_ADDRESS": 3} or \
        "EMAIL_ADDRESS" in (response.get("fields", response))["masking"]["findings"]
    assert not files_containing(ws.records, [EMAIL, UPSTREAM_KEY, ws.alice, ws.bob])


def test_a_blocked_prompt_never_reaches_the_upstream_and_the_session_stays_usable(ws):
    with open_session(ws) as connection:
        connection.send(json.dumps({"type": "response.create", "model": "gpt-test", "input": f"fix {PRIVATE_KEY}"}))
        [error] = events_until(connection, {"error"})
        assert error["error"]["code"] == "gateway_policy_blocked" and "block-private-keys" in error["error"]["message"]
        connection.send(json.dumps({"type": "response.create", "model": "gpt-test", "input": "hello"}))
        assert events_until(connection, {"response.completed", "error"})[-1]["type"] == "response.completed"
    assert [e.get("input") for e in ws.upstream.received] == ["hello"]
    [flow] = websocket_flows(ws.records, predicate=lambda f: any(b"BEGIN RSA" in m.content and m.dropped
                                                                  for m in f.websocket.messages))
    blocked = [e.get("fields", e) for e in events_of(ws.records, "websocket_event", flow.id)]
    assert {(e["policy"]["rule"], e["blocked"]) for e in blocked} == {("block-private-keys", True), ("default", False)}


def test_the_upstream_key_echoed_across_deltas_never_reaches_the_client(ws):
    half = len(UPSTREAM_KEY) // 2
    ws.upstream.reply_deltas = ["your key is ", UPSTREAM_KEY[:half], UPSTREAM_KEY[half:], " ok"]
    with open_session(ws) as connection:
        connection.send(json.dumps({"type": "response.create", "model": "gpt-test", "input": "echo"}))
        events = events_until(connection, {"response.completed", "error"})
    text = json.dumps(events)
    assert UPSTREAM_KEY not in text and UPSTREAM_KEY[:half] not in text and UPSTREAM_KEY[half:] not in text
    # Masking takes an sk- key for an API key first; key custody takes out whatever spelling is left.
    done = next(e for e in events if e["type"] == "response.output_text.done")["text"]
    assert done.startswith("your key is ") and ("[upstream-key-removed]" in done or "<API_KEY>" in done)


def test_a_realtime_session_masks_transcripts_and_records_audio_as_a_digest(ws):
    ws.upstream.reply_deltas = ["mail jane.doe@", "example.com"]
    with open_session(ws, "/v1/realtime?model=gpt-realtime") as connection:
        assert events_until(connection, {"session.created"})
        connection.send(json.dumps({"type": "input_audio_buffer.append", "audio": AUDIO}))
        connection.send(json.dumps({"type": "response.create", "response": {"instructions": "say it"}}))
        events = events_until(connection, {"response.done", "error"})
    assert EMAIL not in json.dumps(events)
    transcript = next(e for e in events if e["type"] == "response.output_audio_transcript.done")["transcript"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"]
    assert transcript == "mail <EMAIL_ADDRESS>" == "".join(deltas), deltas
    assert next(e for e in events if e["type"] == "response.output_audio.delta")["delta"] == AUDIO  # forwarded as is
    assert ws.upstream.received[0]["audio"] == AUDIO
    [flow] = websocket_flows(ws.records, predicate=lambda f: f.request.path.startswith("/v1/realtime"))
    recorded = b"".join(m.content for m in flow.websocket.messages)
    assert AUDIO.encode() not in recorded and EMAIL.encode() not in recorded
    assert hashlib.sha256(AUDIO.encode()).hexdigest().encode() in recorded


def test_an_event_held_for_approval_is_sent_once_a_second_person_grants_it(ws):
    bob = AdminClient(ws.admin, ws.bob)
    with open_session(ws) as connection:
        connection.send(json.dumps({"type": "response.create", "model": "gpt-test",
                                    "input": "please needs-approval-marker now"}))
        [pending] = bob.wait_pending(lambda a: a["rule"] == "approve-marker")
        assert not ws.upstream.received  # held, not sent
        connection.send(json.dumps({"type": "response.create", "model": "gpt-test", "input": "meanwhile"}))
        assert events_until(connection, {"response.completed"})  # the session goes on while one event is held
        assert bob.approve(pending["id"])[0] == 200
        assert events_until(connection, {"response.completed", "error"})[-1]["type"] == "response.completed"
    assert [e["input"] for e in ws.upstream.received] == ["meanwhile", "please needs-approval-marker now"]


@pytest.mark.parametrize("fault", ["masking.websocket_message", "key_custody.websocket_message=skip",
                                   "policy.websocket_message=skip"])
def test_a_failed_or_skipped_concern_ends_the_session_with_1011_and_never_passes_the_message(ws, fault):
    ws.upstream.reply_deltas = [f"mail {EMAIL}"]
    with open_session(ws, headers={"x-test-ws-fault": fault}) as connection:
        connection.send(json.dumps({"type": "response.create", "model": "gpt-test", "input": "hi"}))
        events = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(json.loads(connection.recv(timeout=15)))
    assert closed.value.rcvd.code == 1011
    assert events and events[-1]["type"] == "error" and events[-1]["error"]["code"] == "gateway_internal_error"
    assert EMAIL not in json.dumps(events)
    if fault.startswith("policy"):
        assert not ws.upstream.received


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/audio/speech", "/socket"])
def test_a_websocket_upgrade_to_any_other_path_is_refused_and_recorded(ws, path):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        open_session(ws, path)
    assert refused.value.response.status_code == 501
    assert json.loads(refused.value.response.body)["error"]["code"] == "gateway_websocket_unsupported"
    assert not ws.upstream.upgrades
    assert wait_for_flows(ws.records, lambda f: f.request.path == path and
                          (REFUSAL.read(f.metadata) or {}).get("code") == "gateway_websocket_unsupported")


def test_forward_mode_over_https_proxy_governs_a_session_the_same_way(tmp_path, tls_files):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files.server_cert, tls_files.server_key)
    upstream = WebSocketUpstream(context).start()
    upstream.reply_deltas = ["ask jane.doe@", "example.com"]
    rules = websocket_rules(tmp_path / "rules", upstream.port, host="localhost")
    alice = add_service_token(rules, "alice", ["agents"])
    confdir = ca_confdir(tmp_path)
    gateway = GatewayProcess(tmp_path / "gw", rules=rules, records=tmp_path / "records", confdir=confdir,
                             args=["--set", f"ssl_verify_upstream_trusted_ca={tls_files.ca_cert}"],
                             env=gateway_env()).start()
    try:
        client_tls = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
        with connect(f"wss://localhost:{upstream.port}/v1/responses", proxy=gateway.url, ssl=client_tls,
                     open_timeout=15, additional_headers={"authorization": f"Bearer {alice}"}) as connection:
            connection.send(json.dumps({"type": "response.create", "input": f"x {PRIVATE_KEY}"}))
            assert events_until(connection, {"error"})[-1]["error"]["code"] == "gateway_policy_blocked"
            connection.send(json.dumps({"type": "response.create", "input": "who?"}))
            events = events_until(connection, {"response.completed", "error"})
        assert events[-1]["type"] == "response.completed" and EMAIL not in json.dumps(events)
        assert [e["input"] for e in upstream.received] == ["who?"]
        assert upstream.upgrades[-1]["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert websocket_flows(tmp_path / "records")
        assert not files_containing(tmp_path / "records", [EMAIL, UPSTREAM_KEY, alice])
    finally:
        gateway.stop()
        upstream.stop()


def test_a_session_still_open_when_the_gateway_stops_is_closed_1001_recorded_and_audited(tmp_path):
    """SIGINT (GatewayProcess.stop) while a session is open: mitmproxy itself would exit without ending it."""
    upstream = WebSocketUpstream().start()
    upstream.reply_deltas = ["mail jane.doe@", "example.com now"]
    rules = websocket_rules(tmp_path / "rules", upstream.port)
    alice = add_service_token(rules, "alice", ["agents"])
    records = tmp_path / "records"
    gateway = start_reverse_gateway(tmp_path, rules, upstream.port, records)
    try:
        connection = connect(f"ws://127.0.0.1:{gateway.port}/v1/responses", proxy=None, open_timeout=15,
                             additional_headers={"authorization": f"Bearer {alice}"})
        connection.send(json.dumps({"type": "response.create", "model": "gpt-test", "input": "who?"}))
        events = events_until(connection, {"response.completed", "error"})
        assert events[-1]["type"] == "response.completed"
        gateway.stop()  # the session is still open
        with pytest.raises(ConnectionClosed) as closed:
            connection.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001  # going away, not cut
    finally:
        gateway.stop()
        upstream.stop()
    [flow] = websocket_flows(records)
    assert (flow.websocket.close_code, WEBSOCKET.get(flow)["ended_by"]) == (1001, "gateway_shutdown")
    passed = [json.loads(m.content) for m in flow.websocket.messages if not m.from_client and not m.dropped]
    assert passed == events  # every message so far, as the client got it
    [session] = events_of(records, "websocket_session", flow.id, timeout=0)
    fields = session.get("fields", session)
    assert (fields["ended_by"], fields["close_code"]) == ("gateway_shutdown", 1001)
    assert fields["messages_sha256"] == messages_sha256(flow.websocket.messages)
    assert fields["messages_from_server"] == len(events) and fields["flow_file"]
    assert events_of(records, "flow", flow.id, timeout=0), "the audit log's own entry for the flow"
    assert not files_containing(tmp_path, [EMAIL, UPSTREAM_KEY, alice])
