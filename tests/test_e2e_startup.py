"""Starting the gateway: run_gateway.sh, option validation, the first identity, tokens minted while running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import openai
import pytest
import yaml

from auditgate.core.shipped import SHIPPED_RULES
from auditgate.identity.service_tokens import token_hash
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import (
    GATEWAY_SCRIPT,
    MITMDUMP,
    ROOT,
    GatewayProcess,
    run_mitmdump,
)

pytestmark = pytest.mark.e2e


def _start_script(args: list[str], log_path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """Start run_gateway.sh, wait for the export lines, return the process and its output so far."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(ROOT / "run_gateway.sh"), *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + timeout
    output = ""
    while time.monotonic() < deadline and "auditgate: ready" not in output and proc.poll() is None:
        time.sleep(0.05)
        output = log_path.read_text(errors="replace")
    return proc, log_path.read_text(errors="replace")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(10)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_run_gateway_sh_prints_what_callers_export(tmp_path, confdir, mode):
    rules = make_rules(tmp_path / "rules", upstreams=[{"host": "api.openai.com", "port": 443}])
    args = ["-p", "0", "--set", f"gateway_rules={rules}", "--set", f"gateway_records={tmp_path / 'records'}",
            "--set", f"confdir={confdir}"]
    if mode == "reverse":
        args += ["--mode", "reverse:https://api.openai.com"]
    proc, output = _start_script(args, tmp_path / "gateway.log")
    try:
        assert proc.poll() is None, output
        if mode == "forward":
            assert re.search(r"export HTTPS_PROXY=http://127\.0\.0\.1:\d+", output), output
            assert f"export SSL_CERT_FILE={confdir.resolve() / 'mitmproxy-ca-cert.pem'}" in output
        else:
            assert re.search(r"export OPENAI_BASE_URL=http://127\.0\.0\.1:\d+/v1", output), output
        # No identity was configured: one was minted, its token printed once and only its hash stored.
        token = re.search(r"OPENAI_API_KEY=(agt_[A-Za-z0-9_-]+)", output).group(1)
        stored = yaml.safe_load((rules / "identities.yaml").read_text())["service_tokens"]
        assert stored == [{"name": "operator", "groups": ["admins"], "token_sha256": token_hash(token)}]
        assert token not in (rules / "identities.yaml").read_text()
        # The start-up output ends by pointing at the token it printed.
        assert output.index("export OPENAI_API_KEY=<the token printed above>") < output.index("auditgate: ready")
        assert output.rstrip().splitlines()[-1].endswith("Set it as OPENAI_API_KEY in the caller.")
    finally:
        _stop(proc)


def test_a_first_start_makes_the_operator_rules_from_the_shipped_ones_and_leaves_those_alone(tmp_path, confdir):
    shipped = {p.name: p.read_bytes() for p in SHIPPED_RULES.iterdir()}
    env = dict(gateway_env(), OPENAI_API_KEY="sk-unused")
    proc = subprocess.Popen([MITMDUMP, "-s", GATEWAY_SCRIPT, "-p", "0", "--set", f"confdir={confdir}",
                             "--set", "listen_host=127.0.0.1"],  # no gateway_rules: the default, rules/ of the cwd
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    output, deadline = b"", time.monotonic() + 60
    os.set_blocking(proc.stdout.fileno(), False)
    try:
        while b"auditgate: ready" not in output and time.monotonic() < deadline and proc.poll() is None:
            output += proc.stdout.read() or b""
            time.sleep(0.05)
    finally:
        _stop(proc)
    text = output.decode(errors="replace")
    assert "auditgate: ready" in text, text[-2000:]
    operator_rules = tmp_path / "rules"
    assert {p.name for p in operator_rules.iterdir()} == set(shipped)
    token = re.search(r"OPENAI_API_KEY=(agt_[A-Za-z0-9_-]+)", text).group(1)
    stored = yaml.safe_load((operator_rules / "identities.yaml").read_text())["service_tokens"]
    assert [entry["token_sha256"] for entry in stored] == [token_hash(token)]
    assert {p.name: p.read_bytes() for p in SHIPPED_RULES.iterdir()} == shipped  # the defaults stay as shipped


def test_first_identity_token_works(tmp_path, confdir, upstream_server):
    upstream_server.fake.received.clear()
    rules = make_rules(tmp_path / "rules", upstreams=[])
    gateway = GatewayProcess(tmp_path / "gw", rules=rules, records=tmp_path / "records", confdir=confdir,
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}"],
                             env=gateway_env()).start()
    try:
        token = re.search(r"OPENAI_API_KEY=(agt_\S+)", gateway.log()).group(1)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token)
        assert client.responses.create(model="gpt-test", input="hi").output_text
    finally:
        gateway.stop()
    # The minted token is on the console once; it is in no file under the records.
    assert not [p for p in (tmp_path / "records").rglob("*") if p.is_file() and token.encode() in p.read_bytes()]


def test_token_minted_while_running_is_accepted_without_restart(tmp_path, confdir, upstream_server):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    cli = str(ROOT / ".venv" / "bin" / "auditgate") if (ROOT / ".venv/bin/auditgate").exists() else "auditgate"
    first = subprocess.run([cli, "token", "new", "carol", "--group", "agents", "--rules", str(rules)],
                           capture_output=True, text=True, check=True).stdout.strip()
    gateway = GatewayProcess(tmp_path / "gw", rules=rules, records=tmp_path / "records", confdir=confdir,
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}"],
                             env=gateway_env()).start()
    try:
        minted = subprocess.run([cli, "token", "new", "dave", "--rules", str(rules)],
                                capture_output=True, text=True, check=True)
        token = minted.stdout.strip()
        assert token.startswith("agt_") and token not in (rules / "identities.yaml").read_text()
        time.sleep(1.2)  # identities are re-read at most once a second
        for t in (first, token):
            client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=t, max_retries=0)
            assert client.responses.create(model="gpt-test", input="hi").output_text
        names = {e["name"] for e in yaml.safe_load((rules / "identities.yaml").read_text())["service_tokens"]}
        assert names == {"carol", "dave"}
        duplicate = subprocess.run([cli, "token", "new", "dave", "--rules", str(rules)], capture_output=True, text=True)
        assert duplicate.returncode == 2 and "already exists" in duplicate.stderr
    finally:
        gateway.stop()


def test_missing_upstream_key_refuses_with_502(tmp_path, confdir, upstream_server, rules_and_callers, callers):
    rules, _ = rules_and_callers
    env = gateway_env()
    env["OPENAI_API_KEY"] = ""
    gateway = GatewayProcess(tmp_path / "gw", rules=rules, records=tmp_path / "records", confdir=confdir,
                             args=["--mode", f"reverse:http://127.0.0.1:{upstream_server.port}"], env=env).start()
    try:
        upstream_server.fake.received.clear()
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=callers.alice, max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.responses.create(model="gpt-test", input="hi")
        assert info.value.status_code == 502 and info.value.code == "gateway_upstream_unavailable"
        assert "env:OPENAI_API_KEY" in info.value.message
        assert upstream_server.fake.received == []
    finally:
        gateway.stop()


def _start_fails(tmp_path, confdir, rules, records=None) -> str:
    result = run_mitmdump(["-s", GATEWAY_SCRIPT, "--set", f"confdir={confdir}", "-p", "0",
                           "--set", f"gateway_rules={rules}",
                           "--set", f"gateway_records={records or tmp_path / 'records'}"],
                          env=gateway_env(), timeout=30)
    assert result.returncode != 0, result.stdout
    return result.stdout + result.stderr


def test_missing_rules_directory_stops_the_start(tmp_path, confdir):
    output = _start_fails(tmp_path, confdir, tmp_path / "no-such-dir")
    assert "auditgate:" in output and "upstreams.yaml: file not found" in output


def test_invalid_upstreams_file_names_file_and_reason(tmp_path, confdir):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    (rules / "upstreams.yaml").write_text("upstreams:\n  - host: api.openai.com\n    keyenv: X\n")
    output = _start_fails(tmp_path, confdir, rules)
    assert "upstreams.yaml" in output and "unknown key(s) keyenv" in output


def test_invalid_identities_file_stops_the_start(tmp_path, confdir):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    (rules / "identities.yaml").write_text("service_tokens:\n  - name: x\n    token_sha256: agt_plaintext\n")
    output = _start_fails(tmp_path, confdir, rules)
    assert "identities.yaml" in output and "never the token itself" in output


def test_unwritable_records_directory_stops_the_start(tmp_path, confdir):
    rules = make_rules(tmp_path / "rules", upstreams=[])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    output = _start_fails(tmp_path, confdir, rules, records=blocker)
    assert "gateway_records" in output
