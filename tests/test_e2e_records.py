"""Recording: native mitmproxy flow files, identities in metadata, no secrets on disk, offline replay."""

from __future__ import annotations

import asyncio
import uuid

import openai
import pytest
from mitmproxy import io

from tests.agent_app import run_agent
from tests.conftest import UPSTREAM_KEY, gateway_env
from tests.fake_openai import FakeOpenAI, FakeOpenAIServer
from tests.gateway_process import GATEWAY_SCRIPT, GatewayProcess, run_mitmdump
from tests.records import files_containing, flow_files, read_flows, wait_for_flows

pytestmark = pytest.mark.e2e


def _flows_with(records, marker: str, count: int):
    return wait_for_flows(records, lambda f: marker.encode() in (f.request.content or b""), count)


def test_flows_are_recorded_with_identity_and_without_credentials(reverse_env, upstream, callers, records_root):
    marker = f"marker-{uuid.uuid4().hex}"
    client = openai.OpenAI()
    client.responses.create(model="gpt-test", input=f"plain {marker}")
    with client.responses.stream(model="gpt-test", input=f"streamed {marker}") as stream:
        stream.get_final_response()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key=callers.alice + "x", max_retries=0).responses.create(model="gpt-test", input=f"bad {marker}")

    flows = _flows_with(records_root / "reverse", marker, 3)
    assert len(flows) == 3
    plain, streamed, refused = sorted(flows, key=lambda f: f.request.timestamp_start)
    for flow in (plain, streamed):
        assert flow.response.status_code == 200
        identity = flow.metadata["auditgate.identity"]
        assert identity == {"name": "alice", "groups": ["agents"], "method": "service_token",
                            "token_id": identity["token_id"]}  # a digest's prefix, never the token
        assert identity["token_id"] not in callers.alice
        assert flow.metadata["auditgate.upstream"]["key_source"] == "env:OPENAI_API_KEY"
        assert "authorization" not in flow.request.headers
        assert float(flow.response.headers["x-gateway-overhead-ms"]) >= 0
    # The streamed body is stored as the client received it, events and all.
    assert b"response.completed" in streamed.response.content
    assert streamed.response.headers["content-type"].startswith("text/event-stream")
    # Refused requests are recorded too, with why.
    assert refused.response.status_code == 401
    assert refused.metadata["auditgate.refusal"]["code"] == "gateway_unauthenticated"
    assert "auditgate.identity" not in refused.metadata

    # Nothing the gateway wrote holds the upstream key or a caller token.
    leaks = files_containing(records_root, [UPSTREAM_KEY, *callers.all()])
    assert leaks == []


def test_gateway_output_holds_no_secret(reverse_env, forward_gateway, upstream, callers):
    openai.OpenAI().responses.create(model="gpt-test", input="hello")
    for gateway in (reverse_env, forward_gateway):
        log = gateway.log()
        assert UPSTREAM_KEY not in log and not any(t in log for t in callers.all())


def test_recorded_files_open_with_mitmdump_and_addons_leave_them_alone(reverse_env, upstream, records_root,
                                                                       rules_and_callers, tmp_path, confdir):
    openai.OpenAI().responses.create(model="gpt-test", input="for the reader")
    source = flow_files(records_root / "reverse")[-1]
    listed = run_mitmdump(["-n", "-r", str(source)])
    assert listed.returncode == 0, listed.stderr
    assert "/v1/responses" in listed.stdout

    # Read the file back *with the bundle loaded*: recorded flows carry no token, so if any addon
    # acted on these not-live flows they would turn into 401s or be recorded again.
    out = tmp_path / "reread.mitm"
    rules, _ = rules_and_callers
    reread = run_mitmdump(["-n", "-r", str(source), "-s", GATEWAY_SCRIPT, "--set", f"confdir={confdir}",
                           "--set", f"gateway_rules={rules}", "--set", f"gateway_records={tmp_path / 'rec'}",
                           "-w", str(out)], env=gateway_env())
    assert reread.returncode == 0, reread.stderr
    original = {f.id: f for f in read_flows(records_root / "reverse")}
    with open(out, "rb") as f:
        again = list(io.FlowReader(f).stream())
    assert again
    for flow in again:
        before = original[flow.id]
        assert flow.response.status_code == before.response.status_code
        assert flow.response.content == before.response.content
        assert flow.request.headers.fields == before.request.headers.fields
    assert not list((tmp_path / "rec").rglob("*.mitm"))


def test_offline_replay_of_an_agent_run(tmp_path, confdir, callers, rules_and_callers, monkeypatch):
    rules, _ = rules_and_callers
    server = FakeOpenAIServer(FakeOpenAI(reply_text="Recorded answer.")).start()
    target = f"reverse:http://127.0.0.1:{server.port}"
    recording = GatewayProcess(tmp_path / "rec", rules=rules, records=tmp_path / "records", confdir=confdir,
                               args=["--mode", target], env=gateway_env()).start()
    monkeypatch.setenv("OPENAI_API_KEY", callers.alice)
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{recording.url}/v1")
        live_output = asyncio.run(run_agent("responses"))
        assert len(server.fake.received) == 2
    finally:
        recording.stop()
        server.stop()  # the upstream is gone from here on

    [recorded] = flow_files(tmp_path / "records")
    replaying = GatewayProcess(tmp_path / "replay", rules=rules, records=tmp_path / "records-replay",
                               confdir=confdir, env=gateway_env(),
                               args=["--mode", target, "--set", f"server_replay={recorded}",
                                     "--set", "server_replay_extra=kill"]).start()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{replaying.url}/v1")
        replay_output = asyncio.run(run_agent("responses"))
    finally:
        replaying.stop()
    assert replay_output == live_output == "Recorded answer. Tool said: sunny in Paris"
    assert all(f.is_replay == "response" for f in read_flows(tmp_path / "records-replay"))


def test_recorded_file_opens_in_mitmweb(reverse_env, upstream, records_root, tmp_path, confdir):
    import re
    import socket
    import subprocess
    import time

    import httpx

    from tests.gateway_process import BIN

    openai.OpenAI().responses.create(model="gpt-test", input="for mitmweb")
    source = flow_files(records_root / "reverse")[-1]
    expected = {f.id for f in io.FlowReader(open(source, "rb")).stream()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        web_port = s.getsockname()[1]
    log = tmp_path / "mitmweb.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "mitmweb"), "-r", str(source), "--set", "web_open_browser=false",
                                 "--set", f"web_port={web_port}", "--set", f"confdir={confdir}", "-p", "0",
                                 "--set", "listen_host=127.0.0.1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, token = time.monotonic() + 30, None
        while time.monotonic() < deadline and not token:
            match = re.search(r"\?token=([0-9a-f]+)", log.read_text())
            token = match and match.group(1)
            time.sleep(0.1)
        assert token, log.read_text()
        shown: set[str] = set()
        while time.monotonic() < deadline and not expected <= shown:
            response = httpx.get(f"http://127.0.0.1:{web_port}/flows", headers={"Authorization": f"Bearer {token}"})
            shown = {f["id"] for f in response.json()} if response.status_code == 200 else set()
            time.sleep(0.2)
        assert expected <= shown
    finally:
        proc.terminate()
        proc.wait(10)


def test_refusals_in_forward_mode_are_recorded(forward_env, records_root):
    import httpx

    marker = uuid.uuid4().hex
    with httpx.Client(proxy=forward_env.url) as client:
        assert client.get(f"http://refused-{marker}.invalid/v1/models").status_code == 403
        try:
            client.get(f"https://refused-tls-{marker}.invalid/v1/models")
        except httpx.ProxyError:
            pass
    refused = {f.request.host: f for f in wait_for_flows(records_root / "forward", lambda f: marker in f.request.host, 2)}
    assert set(refused) == {f"refused-{marker}.invalid", f"refused-tls-{marker}.invalid"}
    for flow in refused.values():
        assert flow.response.status_code == 403
        assert flow.metadata["auditgate.refusal"]["code"] == "gateway_forbidden"
    assert refused[f"refused-tls-{marker}.invalid"].request.method == "CONNECT"
