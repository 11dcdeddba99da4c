"""Red team of the WebSocket sessions (issue 13): an insider trying to get a prompt past policy, raw PII
past masking, the upstream key out, or a message past the records, through a real mitmdump with the whole
bundle and the shipped rules, with a raw ``websockets`` client and a scripted local ``websockets``
upstream (below) that sends whatever a test tells it to.

Each test asserts the governed outcome (blocked / masked / refused / recorded and audited). A test that
found a real bypass is marked ``xfail(strict=True, reason="BYPASS: ...")``: it turns red the day the
gateway governs that path, so the mark must then be removed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from auditgate.identity.service_tokens import add_service_token
from tests.conftest import UPSTREAM_KEY
from tests.records import read_flows
from tests.websocket_sessions import (
    ThreadedWebSocketServer,
    WebSocketSetup,
    audit_entries,
    events_until,
    fields_of,
    open_session,
    start_reverse_gateway,
    websocket_rules,
)

pytestmark = pytest.mark.e2e

SECRET = "MIIEowIBAAKCAQEA7xREDTEAMSECRET"  # the key material: what must never reach the upstream
PRIVATE_KEY = f"-----BEGIN RSA PRIVATE KEY-----\n{SECRET}\n-----END RSA PRIVATE KEY-----"
AWS_KEY_ID = "AKIAREDTEAMEXAMPLE12"  # AKIA + 16 of [0-9A-Z]: the shipped block-cloud-api-keys rule
EMAIL = "jane.doe@example.com"


# ---- a scripted upstream ---------------------------------------------------------------------------------
class ScriptedUpstream(ThreadedWebSocketServer):
    """A WebSocket upstream on 127.0.0.1 that records everything it gets and, on each ``response.create``,
    plays the test's script (or a minimal reply): text (str) or binary (bytes) messages, ("ping", payload)
    (a pong carrying that payload back is noted in ``pongs``), ("close", code, reason), ("abort",)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[str | bytes] = []
        self.upgrades: list[dict] = []
        self.script: list | None = None
        self.pongs: list[bytes] = []

    def reset(self) -> None:
        self.received.clear()
        self.upgrades.clear()
        self.pongs.clear()
        self.script = None

    def serve_options(self) -> dict:
        return {"process_response": self._echo_headers}

    @staticmethod
    def _echo_headers(connection, request, response):
        # An upstream that says back, in its 101's headers, the Authorization it was sent.
        if "echo-key" in request.path:
            response.headers["x-echo"] = request.headers.get("authorization", "")
        return response

    async def _session(self, connection) -> None:
        request = connection.request
        self.upgrades.append({"path": request.path, "extensions": [e.name for e in connection.protocol.extensions],
                              **{k.lower(): v for k, v in request.headers.raw_items()}})
        try:
            async for raw in connection:
                self.received.append(raw)
                try:
                    event = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    continue
                if not isinstance(event, dict) or event.get("type") != "response.create":
                    continue
                script, self.script = self.script, None
                for action in script if script is not None else reply("ok"):
                    await self._act(connection, action)
        except ConnectionClosed:
            pass

    async def _act(self, connection, action) -> None:
        if isinstance(action, (str, bytes)):
            await connection.send(action)
        elif action[0] == "ping":
            waiter = await connection.ping(action[1])
            try:
                await asyncio.wait_for(waiter, 2)
                self.pongs.append(action[1])
            except TimeoutError:
                pass
        elif action[0] == "close":
            await connection.close(action[1], action[2])
        elif action[0] == "abort":
            connection.transport.abort()

    def got(self, needle: str) -> bool:
        """Whether any message the upstream received holds ``needle`` (as sent, in whatever frame)."""
        return any(needle in (r if isinstance(r, str) else r.decode("utf-8", "replace")) for r in self.received)


def ev(**fields) -> str:
    return json.dumps(fields)


def reply(text: str, rid: str = "resp_rt", item: str = "msg_rt") -> list[str]:
    return [ev(type="response.created", response={"id": rid, "status": "in_progress", "output": []}),
            ev(type="response.output_text.delta", item_id=item, output_index=0, content_index=0, delta=text),
            completed(rid)]


def completed(rid: str = "resp_rt") -> str:
    return ev(type="response.completed", response={"id": rid, "status": "completed", "output": []})


# ---- the module's gateway ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws-redteam")
    upstream = ScriptedUpstream().start()
    rules = websocket_rules(root / "rules", upstream.port)
    masking = rules / "masking.yaml"
    masking.write_text(masking.read_text().replace("\nworkers: 0\n", "\nworkers: 1\n"))  # starts faster
    alice = add_service_token(rules, "alice", ["agents"])
    gateway = start_reverse_gateway(root, rules, upstream.port, root / "records")
    try:
        yield WebSocketSetup(gateway, upstream, rules, root / "records", alice)
    finally:
        gateway.stop()
        upstream.stop()


@pytest.fixture
def ws(setup):
    setup.upstream.reset()
    return setup


def text_of(events: list[dict]) -> str:
    """What a client holds of these events once parsed (JSON escapes decoded)."""
    return json.dumps(events, ensure_ascii=False)


def probe(connection, setup: WebSocketSetup) -> None:
    """An allowed response.create answered in full: every message sent before it was decided by then."""
    connection.send(ev(type="response.create", model="gpt-test", input="probe"))
    assert events_until(connection, {"response.completed"})[-1]["type"] == "response.completed"


def expect_blocked(connection, code: str = "gateway_policy_blocked") -> dict:
    [error] = events_until(connection, {"error"})
    assert error["error"]["code"] == code, error
    return error


def session_flow(records: Path, marker: str, timeout: float = 10.0):
    """The recorded WebSocket flow one of whose messages holds ``marker``, and its websocket_session entry."""
    deadline = time.monotonic() + timeout
    while True:
        flows = [f for f in read_flows(records) if f.websocket is not None and
                 any(marker.encode() in m.content for m in f.websocket.messages)]
        entries = [fields_of(e) for e in audit_entries(records) if e.get("kind") == "websocket_session"
                   and flows and fields_of(e).get("flow_id") == flows[0].id]
        if entries or time.monotonic() > deadline:
            assert flows, f"no recorded WebSocket flow holds {marker!r}"
            assert entries, f"no websocket_session audit entry for flow {flows[0].id}"
            return flows[0], entries[0]
        time.sleep(0.05)


def recorded_text(flow) -> str:
    """Everything a flow file keeps of a session: its messages and its close frame, as text."""
    ws = flow.websocket
    return "\n".join([m.content.decode("utf-8", "replace") for m in ws.messages] + [str(ws.close_reason)])


# ---- 1. a blocked prompt in every carrier ------------------------------------------------------------------
def _escaped_header() -> str:
    # The PEM header spelled with JSON unicode escapes only: the same text once parsed.
    header = "".join(f"\\u{ord(c):04x}" for c in "-----BEGIN RSA PRIVATE KEY-----")
    return '{"type":"response.create","input":"' + header + "\\n" + SECRET + '"}'


CARRIERS = {
    "input string": ev(type="response.create", model="gpt-test", input=f"fix {PRIVATE_KEY}"),
    "input message list": ev(type="response.create", input=[{"role": "user", "content": PRIVATE_KEY}]),
    "input_text parts": ev(type="response.create", input=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "see"},
                                                        {"type": "input_text", "text": PRIVATE_KEY}]}]),
    "instructions": ev(type="response.create", instructions=PRIVATE_KEY, input="hi"),
    "tool description": ev(type="response.create", input="hi", tools=[
        {"type": "function", "name": "lookup", "description": PRIVATE_KEY, "parameters": {"type": "object"}}]),
    "tool parameter description": ev(type="response.create", input="hi", tools=[
        {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {
            "q": {"type": "string", "description": PRIVATE_KEY}}}}]),
    "realtime response.create under response": ev(type="response.create", response={"instructions": PRIVATE_KEY}),
    "conversation.item.create": ev(type="conversation.item.create", item={
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": PRIVATE_KEY}]}),
    "function_call_output item": ev(type="conversation.item.create", item={
        "type": "function_call_output", "call_id": "c1", "output": PRIVATE_KEY}),
    "session.update instructions": ev(type="session.update", session={"instructions": PRIVATE_KEY}),
    "session.update tools": ev(type="session.update", session={"tools": [
        {"type": "function", "name": "f", "description": PRIVATE_KEY}]}),
    "response.steer": ev(type="response.steer", input=PRIVATE_KEY),
    "unknown event type, nested": ev(type="x.redteam.custom", payload={"deep": [{"note": PRIVATE_KEY}]}),
    "aws key id (control)": ev(type="response.create", input=f"use {AWS_KEY_ID} please"),
    "unicode-escaped header": _escaped_header(),
    "lone surrogate beside it": '{"type":"response.create","input":"\\ud83d ' + json.dumps(PRIVATE_KEY)[1:-1] + '"}',
    "nul inside the text": '{"type":"response.create","input":"a\\u0000' + json.dumps(PRIVATE_KEY)[1:-1] + '"}',
    "duplicate type key": ('{"type":"response.create","input":' + json.dumps(PRIVATE_KEY)
                           + ',"type":"x.noop"}'),
}


@pytest.mark.parametrize("carrier", list(CARRIERS))
def test_a_blocked_prompt_is_blocked_in_every_carrier(ws, carrier):
    secret = AWS_KEY_ID if "aws" in carrier else SECRET
    with open_session(ws) as connection:
        connection.send(CARRIERS[carrier])
        # Duplicate keys: refused unread (policy would read one value, a first-wins upstream the other).
        expect_blocked(connection, "gateway_bad_request" if carrier.startswith("duplicate") else "gateway_policy_blocked")
        probe(connection, ws)  # the session stays usable, and the blocked event was decided before it
    assert not ws.upstream.got(secret)


DANGEROUS_TOOLS = {
    "response.create tools": ev(type="response.create", input="hi", tools=[{"type": "function", "name": "run_shell"}]),
    "built-in local_shell": ev(type="response.create", input="hi", tools=[{"type": "local_shell"}]),
    "realtime response.tools": ev(type="response.create", response={"tools": [{"type": "function",
                                                                                "name": "run_shell"}]}),
    "session.update tools": ev(type="session.update", session={"tools": [{"type": "function", "name": "run_shell"}]}),
    "a function_call item": ev(type="conversation.item.create", item={
        "type": "function_call", "call_id": "c9", "name": "run_shell", "arguments": "{}"}),
}


@pytest.mark.parametrize("carrier", list(DANGEROUS_TOOLS))
def test_a_dangerous_tool_in_any_carrier_is_held_for_approval_not_sent(ws, carrier):
    with open_session(ws) as connection:
        connection.send(DANGEROUS_TOOLS[carrier])
        probe(connection, ws)  # the session goes on; the held event is not sent meanwhile
    assert not ws.upstream.got("shell")


BYPASS_CARRIERS = {
    # Policy reads the string VALUES of an event (auditgate/masking/payload.py _Walk.object walks values,
    # never keys), but a JSON schema's property names are prompt text the model reads.
    "a tool schema's property name": pytest.param(
        ev(type="response.create", input="hi", tools=[{"type": "function", "name": "lookup", "parameters": {
            "type": "object", "properties": {PRIVATE_KEY: {"type": "string"}}}}]),
        ),
    # json.loads keeps the LAST of duplicate keys; the gateway forwards the message as sent, so the
    # upstream gets the first value too (and a first-wins parser reads it).
    "duplicate input keys": pytest.param(
        '{"type":"response.create","input":' + json.dumps(PRIVATE_KEY) + ',"input":"hello"}',
),
    # A file sent inline (base64) is read by the model; policy sees only the base64 text.
    "an inline input_file": pytest.param(
        ev(type="response.create", input=[{"role": "user", "content": [
            {"type": "input_file", "filename": "redteam-keyfile.txt",
             "file_data": "data:text/plain;base64," + base64.b64encode(PRIVATE_KEY.encode()).decode()}]}]),
        ),
    # Strings of >= 1024 base64-alphabet characters are skipped as binary blobs; an AWS key id is all
    # base64 alphabet, so a long run of letters and line breaks with one inside is never matched.
    "an aws key id inside a base64-looking text": pytest.param(
        ev(type="response.create", input="A" * 1100 + "\n" + AWS_KEY_ID + "\n"),
        ),
    # The masking normalizer drops zero-width characters; policy matches the raw text.
    "a zero-width space in the pem header": pytest.param(
        ev(type="response.create", input=PRIVATE_KEY.replace("PRIVATE KEY", "PRIVATE\u200b KEY")),
        ),
}


@pytest.mark.parametrize("raw", list(BYPASS_CARRIERS.values()), ids=list(BYPASS_CARRIERS))
def test_a_blocked_prompt_in_a_carrier_policy_does_not_read_never_reaches_the_upstream(ws, raw):
    with open_session(ws) as connection:
        connection.send(raw)
        events_until(connection, {"error", "response.completed"})  # blocked, or answered: the upstream says which
        probe(connection, ws)
    assert not ws.upstream.got(SECRET) and not ws.upstream.got(AWS_KEY_ID) and not ws.upstream.got("redteam-keyfile")


# ---- 2. frames, paths and timing ---------------------------------------------------------------------------
def test_a_binary_frame_holding_json_is_refused_not_passed(ws):
    with open_session(ws) as connection:
        connection.send(CARRIERS["input string"].encode())
        [error] = events_until(connection, {"error"})
        assert error["error"]["code"] == "gateway_bad_request"
        connection.send(PRIVATE_KEY)  # a text frame that is not JSON
        assert events_until(connection, {"error"})[-1]["error"]["code"] == "gateway_bad_request"
        probe(connection, ws)
    assert not ws.upstream.got(SECRET)


def test_a_fragmented_message_is_decided_whole(ws):
    raw = CARRIERS["input string"]
    with open_session(ws) as connection:
        connection.send([raw[:40], raw[40:80], raw[80:]])  # one message in three frames (continuations)
        expect_blocked(connection)
        probe(connection, ws)
    assert not ws.upstream.got(SECRET)


@pytest.mark.parametrize("compression", ["deflate", None])
def test_a_client_offering_permessage_deflate_gets_a_plain_session_governed_the_same(ws, compression):
    ws.upstream.script = reply(f"write to {EMAIL}")
    with open_session(ws, compression=compression) as connection:
        connection.send(CARRIERS["instructions"])
        expect_blocked(connection)
        connection.send(ev(type="response.create", input="go"))
        events = events_until(connection, {"response.completed"})
    # The offer never reaches the upstream (a compressed frame would be inflated whole before the size limit).
    assert ws.upstream.upgrades[-1]["extensions"] == []
    assert EMAIL not in text_of(events) and not ws.upstream.got(SECRET)


def test_a_message_of_several_megabytes_is_still_decided(ws):
    padding = "lorem ipsum dolor sit amet " * (4 * 1024 * 1024 // 27)  # ~4 MB of prose, the key at the end
    started = time.monotonic()
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=padding + PRIVATE_KEY))
        expect_blocked(connection)
        probe(connection, ws)
    assert time.monotonic() - started < 20
    assert not ws.upstream.got(SECRET)


@pytest.mark.parametrize("path", ["/v1/responses?x=1", "//v1/realtime", "/v1/realtime/", "/v1/realtime?model=m",
                                  "/v1/Responses", "/V1/REALTIME", "/v1/responses/", "/v1/x/../responses"])
def test_every_spelling_of_the_path_is_governed_or_refused(ws, path):
    try:
        connection = open_session(ws, path)
    except InvalidStatus as refused:
        assert refused.response.status_code == 501
        assert json.loads(refused.response.body)["error"]["code"] == "gateway_websocket_unsupported"
        assert not ws.upstream.upgrades
        return
    with connection:
        connection.send(CARRIERS["input string"])
        expect_blocked(connection)
        probe(connection, ws)
    assert not ws.upstream.got(SECRET)


def test_a_second_upgrade_header_does_not_open_an_ungoverned_path(ws):
    with pytest.raises(InvalidStatus) as refused:
        open_session(ws, "/v1/chat/completions", headers=[("Upgrade", "h2c")])
    assert refused.value.response.status_code == 501 and not ws.upstream.upgrades


def test_events_sent_before_the_servers_first_message_are_decided(ws):
    ws.upstream.script = None
    with open_session(ws, "/v1/realtime?model=m") as connection:
        connection.send(CARRIERS["session.update instructions"])  # no wait for anything from the server
        connection.send(CARRIERS["conversation.item.create"])
        assert [e["error"]["code"] for e in events_until(connection, {"error"}) + events_until(connection, {"error"})] == \
            ["gateway_policy_blocked"] * 2
        probe(connection, ws)
    assert not ws.upstream.got(SECRET)


def test_a_burst_of_events_is_decided_one_by_one_and_recorded(ws):
    marker = "burst-redteam-marker"
    sent = [CARRIERS["input string"] if i % 10 == 3 else ev(type="x.note", text=f"{marker} {i}") for i in range(150)]
    with open_session(ws) as connection:
        for raw in sent:
            connection.send(raw)
        connection.send(ev(type="response.create", input="probe"))
        events = events_until(connection, {"response.completed"})
    assert [e["type"] for e in events[:15]] == ["error"] * 15 and events[15]["type"] == "response.created"
    allowed = [json.loads(r)["text"] for r in sent if SECRET not in r]
    got = [json.loads(r)["text"] for r in ws.upstream.received if isinstance(r, str) and marker in r]
    assert got == allowed and not ws.upstream.got(SECRET)
    flow, session = session_flow(ws.records, marker)
    assert session["messages_from_client"] == 151 and session["blocked"] == 15
    decided = [fields_of(e) for e in audit_entries(ws.records)
               if e.get("kind") == "websocket_event" and fields_of(e).get("flow_id") == flow.id]
    assert len(decided) == 151 and sum(e["blocked"] for e in decided) == 15


# ---- 3. PII in what the server sends -------------------------------------------------------------------------
SERVER_CARRIERS = {
    "output_item.added with content": ev(type="response.output_item.added", output_index=0, item={
        "id": "m1", "type": "message", "role": "assistant",
        "content": [{"type": "output_text", "text": f"mail {EMAIL}"}]}),
    "content_part.added": ev(type="response.content_part.added", item_id="m1", output_index=0, content_index=0,
                             part={"type": "output_text", "text": f"mail {EMAIL}"}),
    "content_part.done": ev(type="response.content_part.done", item_id="m1", output_index=0, content_index=0,
                            part={"type": "output_text", "text": f"mail {EMAIL}"}),
    "conversation.item.created echo": ev(type="conversation.item.created", item={
        "id": "i1", "type": "message", "role": "user",
        "content": [{"type": "input_audio", "transcript": f"mail {EMAIL}"}, {"type": "input_text", "text": EMAIL}]}),
    "error event message": ev(type="error", error={"type": "invalid_request_error", "code": "bad",
                                                   "message": f"unknown user {EMAIL}", "param": None}),
    "function_call_arguments.done": ev(type="response.function_call_arguments.done", item_id="f1", output_index=0,
                                       arguments=json.dumps({"to": EMAIL})),
    "unknown event, nested": ev(type="x.redteam.server", data={"list": [{"note": f"to {EMAIL}"}]}),
    "rate_limits.updated extra field": ev(type="rate_limits.updated", rate_limits=[
        {"name": "requests", "limit": 5, "remaining": 4, "note": EMAIL}]),
    "json-escaped address": '{"type":"response.output_text.done","item_id":"m1","output_index":0,'
                            '"content_index":0,"text":"mail jane.doe\\u0040example\\u002ecom"}',
    "lone surrogate beside it": '{"type":"response.output_text.done","item_id":"m1","output_index":0,'
                                '"content_index":0,"text":"\\ud83d mail ' + EMAIL + '"}',
    "not json": f"plain text to {EMAIL}",
    "a json list": json.dumps([{"text": EMAIL}]),
    "a non-string type": json.dumps({"type": 5, "text": EMAIL}),
}


@pytest.mark.parametrize("carrier", list(SERVER_CARRIERS))
def test_pii_in_any_server_event_is_masked_or_the_session_refused(ws, carrier):
    ws.upstream.script = [SERVER_CARRIERS[carrier], completed()]
    marker = f"server-carrier {carrier}"
    events = []
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=marker))
        try:
            events = events_until(connection, {"response.completed"})
            assert len(events) == 2  # one event in, one out
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1011  # refused, never passed
    assert EMAIL not in text_of(events) and "jane.doe" not in text_of(events)
    flow, _ = session_flow(ws.records, marker)
    assert EMAIL not in recorded_text(flow)


def test_a_binary_server_frame_is_refused_with_1011(ws):
    ws.upstream.script = [f"{{\"type\":\"x\",\"text\":\"{EMAIL}\"}}".encode(), completed()]
    events = []
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input="binary-server-frame"))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(json.loads(connection.recv(timeout=15)))
    assert closed.value.rcvd.code == 1011
    assert events[-1]["error"]["code"] == "gateway_internal_error" and EMAIL not in text_of(events)


def test_pii_in_a_server_events_type_is_masked(ws):
    ws.upstream.script = [ev(type=f"note.{EMAIL}", text="x"), completed()]
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input="type-carrier"))
        events = events_until(connection, {"response.completed"})
    assert EMAIL not in text_of(events)


def test_pii_split_across_deltas_of_interleaved_responses_never_reaches_the_client(ws):
    # Realtime runs responses side by side (out-of-band ones): another response ending between two
    # deltas of the first must not let the first's held tail out.
    def delta(text):
        return ev(type="response.output_text.delta", response_id="rA", item_id="iA", output_index=0,
                  content_index=0, delta=text)

    ws.upstream.script = [
        ev(type="response.created", response={"id": "rA", "status": "in_progress"}),
        delta("please mail jane.doe@exa"),
        ev(type="response.done", response={"id": "rB", "status": "completed", "output": []}),
        delta("mple.com today"),
        ev(type="response.output_text.done", response_id="rA", item_id="iA", output_index=0, content_index=0,
           text=f"please mail {EMAIL} today"),
        ev(type="response.done", response={"id": "rA", "status": "completed", "output": [
            {"id": "iA", "type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": f"please mail {EMAIL} today"}]}]})]
    with open_session(ws, "/v1/realtime") as connection:
        connection.send(ev(type="response.create", input="interleaved"))
        events = events_until(connection, {"response.done"})
        events += events_until(connection, {"response.done"})
    deltas = "".join(e.get("delta", "") for e in events if e.get("type") == "response.output_text.delta")
    assert EMAIL not in text_of(events) and EMAIL not in deltas and "jane.doe@exa" not in deltas


def test_the_upstream_key_split_across_deltas_of_interleaved_responses_never_reaches_the_client(ws):
    half = len(UPSTREAM_KEY) // 2

    def delta(text):
        return ev(type="response.output_text.delta", response_id="rK", item_id="iK", output_index=0,
                  content_index=0, delta=text)

    ws.upstream.script = [
        ev(type="response.created", response={"id": "rK", "status": "in_progress"}),
        delta(f"key {UPSTREAM_KEY[:half]}"),
        ev(type="response.done", response={"id": "rOther", "status": "completed", "output": []}),
        delta(f"{UPSTREAM_KEY[half:]} ok"),
        ev(type="response.done", response={"id": "rK", "status": "completed", "output": []})]
    with open_session(ws, "/v1/realtime") as connection:
        connection.send(ev(type="response.create", input="interleaved-key"))
        events = events_until(connection, {"response.done"})
        events += events_until(connection, {"response.done"})
    deltas = "".join(e.get("delta", "") for e in events if e.get("type") == "response.output_text.delta")
    assert UPSTREAM_KEY not in deltas and UPSTREAM_KEY[:half] not in deltas and UPSTREAM_KEY[half:] not in deltas


# ---- 4. the upstream key ------------------------------------------------------------------------------------
def _escaped(text: str) -> str:
    return "\\u%04x" % ord(text[0]) + text[1:]


@pytest.mark.parametrize("spelling", [
    "in an unknown event", "in an error param", "json-escaped in an error param"])
def test_the_upstream_key_echoed_in_a_server_event_never_reaches_the_client(ws, spelling):
    key = _escaped(UPSTREAM_KEY) if spelling.startswith("json-escaped") else UPSTREAM_KEY
    event = ('{"type":"x.redteam.echo","detail":{"k":"' + key + '"}}' if spelling == "in an unknown event" else
             '{"type":"error","error":{"type":"invalid_request_error","code":"invalid_api_key",'
             '"message":"bad key","param":"' + key + '"}}')
    ws.upstream.script = [event, completed()]
    marker = f"key-echo {spelling}"
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=marker))
        events = events_until(connection, {"response.completed"})
    assert UPSTREAM_KEY not in text_of(events)
    flow, session = session_flow(ws.records, marker)
    assert UPSTREAM_KEY not in recorded_text(flow)


@pytest.mark.parametrize("secret", ["key", "pii"])
def test_the_key_or_pii_in_the_upstreams_close_reason_never_reaches_the_client_or_the_records(ws, secret):
    value = UPSTREAM_KEY if secret == "key" else EMAIL
    ws.upstream.script = [("close", 4000, f"bad {value}")]
    marker = f"close-reason {secret}"
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=marker))
        with pytest.raises(ConnectionClosed) as closed:
            connection.recv(timeout=15)
    assert value not in str(closed.value.rcvd.reason if closed.value.rcvd else "")
    flow, session = session_flow(ws.records, marker)
    assert value not in recorded_text(flow)


def test_the_upstream_key_in_a_server_ping_never_reaches_the_client_or_the_log(ws):
    ws.upstream.script = [("ping", f"k={UPSTREAM_KEY}".encode()), completed()]
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input="server-ping"))
        events_until(connection, {"response.completed"})
    # The client answers a ping with a pong of the same payload: a pong back means the key reached it.
    assert not ws.upstream.pongs
    assert f"k={UPSTREAM_KEY}" not in ws.gateway.log()  # this ping's payload (other tests leave the key too)


def test_pii_in_a_client_ping_is_neither_logged_nor_passed_unrecorded(ws):
    pinged = "ping.redteam@example.com"
    with open_session(ws) as connection:
        assert connection.ping(pinged.encode()).wait(10)
        probe(connection, ws)
    assert pinged not in ws.gateway.log()


def test_the_upstream_key_echoed_in_the_upgrades_response_headers_never_reaches_the_client(ws):
    with open_session(ws, "/v1/responses?echo-key=1") as connection:
        echoed = connection.response.headers.get("x-echo", "")
        probe(connection, ws)
    assert ws.upstream.upgrades[-1]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the echo is real
    assert echoed and UPSTREAM_KEY not in echoed


# ---- 5. the records -----------------------------------------------------------------------------------------
def test_a_session_the_upstream_cuts_mid_response_is_recorded_and_audited(ws):
    ws.upstream.script = [ev(type="response.created", response={"id": "rc", "status": "in_progress"}),
                          ev(type="response.output_text.delta", item_id="m", output_index=0, content_index=0,
                             delta=f"cut-redteam {EMAIL}"), ("abort",)]
    marker = "cut-session-redteam"
    events = []
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=marker))
        with pytest.raises(ConnectionClosed):
            while True:
                events.append(json.loads(connection.recv(timeout=15)))
    assert EMAIL not in text_of(events)
    flow, session = session_flow(ws.records, marker)
    assert any(b"cut-redteam" in m.content for m in flow.websocket.messages)
    assert EMAIL not in recorded_text(flow)
    assert session["messages_from_client"] == 1 and session["messages_from_server"] >= 1


def test_a_rule_added_while_a_session_is_open_governs_its_next_event(ws):
    marker = "redteam-late-marker"
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=f"say {marker}"))
        assert events_until(connection, {"response.completed"})[-1]["type"] == "response.completed"
        policy = ws.rules / "policy.yaml"
        policy.write_text(policy.read_text().replace("\nrules:\n", "\nrules:\n  - id: redteam-late-rule\n"
                                                     "    match:\n      text:\n        keywords: [" + marker
                                                     + "]\n    action: block\n", 1))
        deadline = time.monotonic() + 10
        while True:  # the edit is picked up within a second or so: until then the event still passes
            connection.send(ev(type="response.create", input=f"say {marker} again"))
            last = events_until(connection, {"response.completed", "error"})[-1]
            if last["type"] == "error" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert last["type"] == "error" and "redteam-late-rule" in last["error"]["message"]
        probe(connection, ws)


# ---- 6. websocket-hardening: close reasons, pings, structural fields, message size -----------------------------
# (Before the last test of the module, which stops its gateway.)
WITHHELD_REASON = "reason withheld by the gateway"
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # gateway_websocket_max_message_bytes' default


@pytest.fixture
def upstream_closes(ws, monkeypatch):
    """The scripted upstream learns one more action, ("await_close",): it waits for the gateway's close frame
    and notes its code and reason in the returned dict."""
    seen: dict = {}
    act = ws.upstream._act

    async def acting(connection, action):
        if action[0] != "await_close":
            return await act(connection, action)
        await connection.wait_closed()
        seen.update(code=connection.close_code, reason=connection.close_reason)

    monkeypatch.setattr(ws.upstream, "_act", acting)
    return seen


def _session_of(records: Path, marker: str, timeout: float = 10.0) -> dict:
    return session_flow(records, marker, timeout)[1]


def test_pii_in_the_clients_close_reason_never_reaches_the_upstream_or_the_records(ws, upstream_closes):
    ws.upstream.script = [("await_close",)]
    marker = "client-close-reason"
    reason = f"bye {EMAIL}"
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=marker))
        connection.close(4001, reason)
    deadline = time.monotonic() + 10
    while not upstream_closes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream_closes == {"code": 4001, "reason": WITHHELD_REASON}  # the code passes, the reason does not
    flow, session = session_flow(ws.records, marker)
    assert EMAIL not in recorded_text(flow) and flow.websocket.close_reason == WITHHELD_REASON
    assert session["close_reason"] == {"from": "client", "bytes": len(reason),
                                       "sha256": hashlib.sha256(reason.encode()).hexdigest()}
    assert EMAIL not in ws.gateway.log()


def test_the_upstreams_withheld_close_reason_is_audited_as_a_digest(ws):
    reason = f"bad {UPSTREAM_KEY}"
    ws.upstream.script = [("close", 4002, reason)]
    marker = "close-reason digest"
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=marker))
        with pytest.raises(ConnectionClosed) as closed:
            connection.recv(timeout=15)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, WITHHELD_REASON)
    session = _session_of(ws.records, marker)
    assert session["close_reason"]["from"] == "upstream"
    assert session["close_reason"]["sha256"] == hashlib.sha256(reason.encode()).hexdigest()
    assert UPSTREAM_KEY not in json.dumps(audit_entries(ws.records))


def test_a_clients_ping_is_answered_by_the_gateway_with_its_own_payload(ws):
    # The client's keepalive matches the pong's payload: answered at once, the payload going nowhere else.
    with open_session(ws) as connection:
        for payload in (b"", b"\x00\xff keepalive", f"p {EMAIL}".encode()[:125]):
            assert connection.ping(payload).wait(10)
        probe(connection, ws)
    assert f"p {EMAIL}" not in ws.gateway.log()


def test_the_upstream_key_json_escaped_in_an_object_key_or_a_duplicate_never_reaches_the_client(ws):
    escaped = _escaped(UPSTREAM_KEY)
    ws.upstream.script = ['{"type":"x.redteam.keys","detail":{"' + escaped + '":1}}',
                          '{"type":"error","error":{"code":"x","param":"' + escaped + '","param":null}}',
                          completed()]
    marker = "escaped key names"
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=marker))
        raws = []
        while not raws or '"response.completed"' not in raws[-1]:
            raws.append(connection.recv(timeout=15))
    assert all(UPSTREAM_KEY not in json.dumps(json.loads(r, object_pairs_hook=list)) for r in raws)
    flow, session = session_flow(ws.records, marker)
    assert UPSTREAM_KEY not in recorded_text(flow) and session["key_echoes"] >= 2


def test_the_upstream_key_json_escaped_in_a_server_events_type_never_reaches_the_client(ws):
    ws.upstream.script = ['{"type":"x.' + _escaped(UPSTREAM_KEY) + '","text":"x"}', completed()]
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input="key-type-carrier"))
        events = events_until(connection, {"response.completed"})
    assert UPSTREAM_KEY not in text_of(events) and len(events) == 2


def _too_big(recv) -> tuple[list[dict], ConnectionClosed]:
    events = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            events.append(json.loads(recv(timeout=15)))
    return events, closed.value


def test_a_client_message_over_the_size_limit_is_refused_with_1009_never_relayed(ws):
    marker = "oversized-client"
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=marker))
        events_until(connection, {"response.completed"})
        connection.send(ev(type="response.create", input=f"{marker}-big " + "a" * MAX_MESSAGE_BYTES))
        events, closed = _too_big(connection.recv)
    assert [e["error"]["code"] for e in events] == ["gateway_message_too_large"]
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    assert not ws.upstream.got(f"{marker}-big")
    flow, session = session_flow(ws.records, marker)
    assert session["close_code"] == 1009 and session["failed"].startswith("size_limit")
    assert session["ended_by"] == "gateway" and session["messages_from_client"] == 2
    refused = flow.websocket.messages[-2] if not flow.websocket.messages[-1].from_client else \
        flow.websocket.messages[-1]
    assert refused.from_client and refused.dropped and json.loads(refused.content)["limit"] == MAX_MESSAGE_BYTES


def test_a_server_message_over_the_size_limit_is_refused_with_1009_never_relayed(ws):
    marker = "oversized-server"
    big = ev(type="response.output_text.delta", item_id="m", output_index=0, content_index=0,
             delta=f"big {EMAIL} " + "b" * MAX_MESSAGE_BYTES)
    ws.upstream.script = [ev(type="response.created", response={"id": "rbig", "status": "in_progress"}), big,
                          completed("rbig")]
    with open_session(ws) as connection:
        connection.send(ev(type="response.create", input=marker))
        events, closed = _too_big(connection.recv)
    assert [e["type"] for e in events] == ["response.created", "error"]
    assert events[-1]["error"]["code"] == "gateway_message_too_large"
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    flow, session = session_flow(ws.records, marker)
    assert session["close_code"] == 1009 and session["failed"].startswith("size_limit: a message from the upstream")
    assert EMAIL not in recorded_text(flow) and not any(len(m.content) > MAX_MESSAGE_BYTES
                                                        for m in flow.websocket.messages)


# Last in the module: it stops the module's gateway (run alone, it starts its own through the fixture).
def test_zz_a_session_still_open_when_the_gateway_stops_is_recorded_and_audited(ws):
    marker = "open-at-shutdown-redteam"
    connection = open_session(ws)
    try:
        connection.send(ev(type="response.create", input=marker))
        assert events_until(connection, {"response.completed"})[-1]["type"] == "response.completed"
        ws.gateway.stop()  # SIGINT, as an operator stops it; the session was never closed
    finally:
        connection.close()
    flow, session = session_flow(ws.records, marker, timeout=1)
    assert any(b"probe" not in m.content and marker.encode() in m.content for m in flow.websocket.messages)
