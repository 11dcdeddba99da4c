"""In mitmweb a held request shows as held (comment and mark), and resuming it there does not let it through."""

from __future__ import annotations

import secrets
import socket
import threading
import time

import httpx
import openai
import pytest
from mitmproxy.utils.emoji import emoji

from auditgate.identity.service_tokens import add_service_token
from tests.approval_gateway import AdminClient, add_test_rules, admin_url
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import BIN, GatewayProcess

pytestmark = pytest.mark.e2e


class MitmwebGateway(GatewayProcess):
    def __init__(self, *args, web_port: int, web_password: str, **kw) -> None:
        super().__init__(*args, **kw)
        self.web_port, self.web_password = web_port, web_password

    def command(self) -> list[str]:
        command = super().command()
        command[0] = str(BIN / "mitmweb")
        return command + ["--set", "web_open_browser=false", "--set", "web_host=127.0.0.1",
                          "--set", f"web_port={self.web_port}", "--set", f"web_password={self.web_password}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mitmweb_shows_the_hold_and_its_resume_button_does_not_bypass_it(tmp_path, confdir, upstream_server, upstream):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    add_test_rules(rules)
    alice = add_service_token(rules, "alice", ["agents"])
    bob = add_service_token(rules, "bob", ["approvers"])
    password = secrets.token_hex(16)
    gateway = MitmwebGateway(tmp_path / "gw", rules=rules, records=tmp_path / "records", confdir=confdir,
                             env=gateway_env(), web_port=_free_port(), web_password=password,
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}",
                                   "--set", "approval_admin_listen=127.0.0.1:0"]).start()
    try:
        out: dict = {}

        def call():
            client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=alice, max_retries=0)
            try:
                out["result"] = client.responses.create(model="gpt-test", input="mitmweb-e2e needs-approval-marker")
            except Exception as e:
                out["error"] = e

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        approver = AdminClient(admin_url(gateway), bob)
        [pending] = approver.wait_pending()
        web = httpx.Client(base_url=f"http://127.0.0.1:{gateway.web_port}",
                           headers={"authorization": f"Bearer {password}"}, timeout=10)
        deadline = time.monotonic() + 10
        while True:
            flows = [f for f in web.get("/flows").json() if f["id"] == pending["flows"][0]]
            if flows and flows[0]["comment"].startswith("held for approval"):
                break
            assert time.monotonic() < deadline, flows
            time.sleep(0.1)
        [flow] = flows
        assert flow["comment"] == f"held for approval {pending['id']} (rule approve-marker)"
        assert flow["marked"] == emoji[":hourglass_flowing_sand:"]  # mitmweb sends the mark as its emoji
        # Press "resume" the way mitmweb's UI does (double-submit XSRF token): the flow stays held.
        xsrf = secrets.token_hex(16)
        web.cookies.set("_mitmproxy_xsrf", xsrf)
        assert web.post(f"/flows/{flow['id']}/resume", headers={"x-xsrftoken": xsrf}).status_code == 200
        assert web.post("/flows/resume", headers={"x-xsrftoken": xsrf}).status_code == 200
        time.sleep(1.0)
        assert upstream.received == [] and "result" not in out and "error" not in out
        assert [a["id"] for a in approver.pending()] == [pending["id"]]
        assert approver.approve(pending["id"])[0] == 200
        thread.join(15)
        assert out["result"].output_text == "Hello from the fake upstream." and len(upstream.received) == 1
        deadline = time.monotonic() + 10
        while web.get("/flows").json()[0]["marked"] != emoji[":white_check_mark:"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        gateway.stop()
