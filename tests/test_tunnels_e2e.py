"""Tunnels through a real mitmdump in forward mode: a pass-through host needs a caller and is audited; raw bytes are refused.

The pass-through host is a TLS echo server on 127.0.0.1 that counts the connections it accepts and the
bytes it reads; the intercepted upstream is a plain TCP server that does the same. Clients speak CONNECT
on raw sockets, so each test controls exactly which bytes are sent and when.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time

import pytest
import yaml

from auditgate.audit.verify import verify
from auditgate.identity.service_tokens import add_service_token
from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GATEWAY_SCRIPT, GatewayProcess, run_mitmdump

pytestmark = pytest.mark.e2e


class _Recorder(socketserver.ThreadingTCPServer):
    """Accepts connections on 127.0.0.1, keeps what it reads, and echoes it back (over TLS if given a context)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.tls = tls
        self.accepted = 0
        self.received = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _Recorder = self.server
        with server.lock:
            server.accepted += 1
        conn = self.request
        conn.settimeout(10)
        try:
            if server.tls:
                conn = server.tls.wrap_socket(conn, server_side=True)
            while data := conn.recv(65536):
                with server.lock:
                    server.received += data
                if data.startswith(b"GET /upgrade "):  # an upstream that switches to a protocol nobody reads
                    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: Upgrade\r\n\r\n")
                else:
                    conn.sendall(data)
        except (OSError, ssl.SSLError):
            pass


@pytest.fixture(scope="module")
def passthrough_host(tls_files) -> _Recorder:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files.server_cert, tls_files.server_key)
    server = _Recorder(context)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def raw_upstream() -> _Recorder:
    server = _Recorder()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tunnel_rules(tmp_path_factory, passthrough_host, raw_upstream):
    """Rules with a pass-through host, an intercepted upstream, and grants: carol may tunnel, alice may not."""
    rules = make_rules(tmp_path_factory.mktemp("tunnel-rules") / "rules",
                       upstreams=[{"host": "localhost", "port": raw_upstream.port}],
                       passthrough=[{"host": "127.0.0.1", "port": passthrough_host.port}])
    tokens = {
        "alice": add_service_token(rules, "alice", ["agents"]),
        "carol": add_service_token(rules, "carol", ["tunnelers"]),
    }
    identities = yaml.safe_load((rules / "identities.yaml").read_text())
    identities["authorization"] = {"grants": [
        {"groups": ["agents"], "upstreams": ["localhost:*"]},  # every upstream request, but no tunnel
        {"groups": ["tunnelers"], "upstreams": [f"127.0.0.1:{passthrough_host.port}"]},
    ]}
    (rules / "identities.yaml").write_text(yaml.safe_dump(identities))
    return rules, tokens


@pytest.fixture(scope="module")
def tunnel_gateway(tmp_path_factory, confdir, tunnel_rules):
    rules, tokens = tunnel_rules
    base = tmp_path_factory.mktemp("tunnels")
    gateway = GatewayProcess(base / "gw", rules=rules, records=base / "records", confdir=confdir,
                             env=gateway_env()).start()
    gateway.tokens = tokens
    yield gateway
    gateway.stop()


def _connect(gateway, host: str, port: int, credential: str | None = None, scheme: str = "basic"):
    """CONNECT through the gateway: the socket, the status, the response headers (lowercased) and body."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if credential and scheme == "basic":
        head += f"Proxy-Authorization: Basic {base64.b64encode(f'agent:{credential}'.encode()).decode()}\r\n"
    elif credential:
        head += f"Proxy-Authorization: Bearer {credential}\r\n"
    sock.sendall((head + "\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    header_block, _, body = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: list[tuple[str, str]] = [(k.strip().lower(), v.strip()) for k, _, v in (l.partition(":") for l in lines[1:])]
    length = int(dict(headers).get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return sock, status, headers, body


def _reply(sock: socket.socket, timeout: float) -> bytes | None:
    """What the gateway sends next: bytes, b"" once it closed the connection, None if nothing within timeout."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return b""


def _audit_entries(gateway) -> list[dict]:
    audit = gateway.records / "audit"
    return [json.loads(line) for path in sorted(audit.glob("audit-*.jsonl")) for line in path.read_bytes().splitlines()
            if line.endswith(b"}")]


def _wait_for_entries(gateway, predicate, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in _audit_entries(gateway) if predicate(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.mark.parametrize("credential", [None, "agt_not-a-real-token"])
def test_passthrough_without_a_valid_credential_is_407_and_the_host_is_never_reached(tunnel_gateway,
                                                                                     passthrough_host, credential):
    before = passthrough_host.accepted
    sock, status, headers, body = _connect(tunnel_gateway, "127.0.0.1", passthrough_host.port, credential)
    assert status == 407
    assert ("proxy-authenticate", 'Basic realm="auditgate"') in headers
    assert json.loads(body)["error"]["code"] == "gateway_unauthenticated"
    # Whatever the client sends next goes nowhere.
    sock.sendall(b"\x16\x03\x01 not relayed")
    assert not _reply(sock, timeout=0.5)  # closed, or no answer: nothing came back from anywhere
    sock.close()
    time.sleep(0.3)
    assert passthrough_host.accepted == before and b"not relayed" not in passthrough_host.received
    refused = _wait_for_entries(tunnel_gateway, lambda e: e["kind"] == "flow" and e["method"] == "CONNECT"
                                and e["status"] == 407)
    assert refused and refused[-1]["refusal"]["code"] == "gateway_unauthenticated"
    if credential:
        assert credential not in tunnel_gateway.log()


def test_passthrough_for_a_caller_without_a_grant_is_403(tunnel_gateway, passthrough_host):
    before = passthrough_host.accepted
    sock, status, _, body = _connect(tunnel_gateway, "127.0.0.1", passthrough_host.port,
                                     tunnel_gateway.tokens["alice"])
    sock.close()
    assert status == 403
    error = json.loads(body)["error"]
    assert error["code"] == "gateway_forbidden" and "not granted" in error["message"]
    time.sleep(0.3)
    assert passthrough_host.accepted == before


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_passthrough_with_credentials_is_relayed_metered_and_audited(tunnel_gateway, passthrough_host, tls_files,
                                                                      scheme):
    sock, status, _, _ = _connect(tunnel_gateway, "127.0.0.1", passthrough_host.port,
                                  tunnel_gateway.tokens["carol"], scheme)
    assert status == 200
    # The client talks TLS with the pass-through host itself: the gateway reads nothing.
    client_tls = ssl.create_default_context(cafile=tls_files.ca_cert)
    payload = f"ping {scheme} ".encode() * 1000
    with client_tls.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(payload)
        echoed = b""
        while len(echoed) < len(payload):
            chunk = tls.recv(65536)
            assert chunk, "the tunnel closed before the echo came back"
            echoed += chunk
    assert echoed == payload and payload in passthrough_host.received

    [opened] = _wait_for_entries(tunnel_gateway, lambda e: e["kind"] == "tunnel" and e["event"] == "opened"
                                 and e["caller"] == "carol" and e["tunnel_id"] not in _seen)
    [closed] = _wait_for_entries(tunnel_gateway, lambda e: e["kind"] == "tunnel" and e["event"] == "closed"
                                 and e["tunnel_id"] == opened["tunnel_id"])
    _seen.add(opened["tunnel_id"])
    assert opened["seq"] < closed["seq"]
    assert (closed["caller"], closed["host"], closed["port"]) == ("carol", "127.0.0.1", passthrough_host.port)
    assert opened["identity"]["groups"] == ["tunnelers"]
    # TLS records wrap the payload: at least the payload each way, not much more.
    assert len(payload) <= closed["bytes_up"] < len(payload) + 4096
    assert len(payload) <= closed["bytes_down"] < len(payload) + 4096
    assert closed["duration_ms"] >= 0 and closed["ended"] == "closed"
    # The token went nowhere: not into the log, not into the audit log, not to the host.
    token = tunnel_gateway.tokens["carol"]
    assert token not in tunnel_gateway.log()
    assert token.encode() not in passthrough_host.received
    assert not [p for p in tunnel_gateway.records.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    result = verify(tunnel_gateway.records)
    assert result.status in ("verified", "incomplete")
    assert not [f for f in result.findings if f.severity == "failed"], result.summary()


_seen: set[str] = set()


def test_raw_tcp_after_connect_to_an_intercepted_upstream_is_refused(tunnel_gateway, raw_upstream):
    before = raw_upstream.accepted
    sock, status, _, _ = _connect(tunnel_gateway, "localhost", raw_upstream.port)
    assert status == 200  # an intercepted upstream: each request in it is authenticated, so the CONNECT needs none
    sock.sendall(b"\x00\x01\x02 raw bytes, neither TLS nor HTTP\n")
    assert _reply(sock, timeout=5) == b"", "the gateway must close the tunnel, not leave it open"
    sock.close()
    time.sleep(0.3)
    assert raw_upstream.accepted == before and b"raw bytes" not in raw_upstream.received
    [refused] = _wait_for_entries(tunnel_gateway, lambda e: e["kind"] == "tunnel" and e["event"] == "refused"
                                  and e["what"] == "TCPLayer" and e["port"] == raw_upstream.port)[-1:]
    assert refused["host"] == "localhost" and refused["caller"] is None


def test_raw_bytes_inside_tls_to_an_intercepted_upstream_are_refused(tunnel_gateway, raw_upstream, confdir):
    before = raw_upstream.accepted
    sock, status, _, _ = _connect(tunnel_gateway, "localhost", raw_upstream.port)
    assert status == 200
    client_tls = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
    with client_tls.wrap_socket(sock, server_hostname="localhost") as tls:  # the gateway's own certificate
        tls.sendall(b"SSH-2.0-not-http\r\n\x00\x01\x02 raw bytes in TLS\n")
        assert _reply(tls, timeout=5) == b"", "the gateway must close the tunnel, not leave it open"
    time.sleep(0.3)
    assert raw_upstream.accepted == before and b"raw bytes in TLS" not in raw_upstream.received
    assert _wait_for_entries(tunnel_gateway, lambda e: e["kind"] == "tunnel" and e["event"] == "refused"
                             and e["what"] == "TCPLayer" and e["port"] == raw_upstream.port)


def test_a_switch_to_a_raw_protocol_after_http_101_is_refused(tunnel_gateway, raw_upstream):
    # An authenticated request to an intercepted upstream that answers 101: mitmproxy would relay raw TCP next.
    sock, status, _, _ = _connect(tunnel_gateway, "localhost", raw_upstream.port, tunnel_gateway.tokens["alice"])
    assert status == 200
    sock.sendall(f"GET /upgrade HTTP/1.1\r\nHost: localhost:{raw_upstream.port}\r\nConnection: Upgrade\r\n"
                 "Upgrade: raw\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = _reply(sock, timeout=5)
        assert chunk, f"no answer to the upgrade: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 502 "), head
    header_block, _, body = head.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", header_block).group(1))
    while len(body) < length and (chunk := _reply(sock, timeout=5)):
        body += chunk
    assert json.loads(body)["error"]["code"] == "gateway_protocol_refused"
    assert b"GET /upgrade" in raw_upstream.received  # the request itself was governed and sent
    try:
        sock.sendall(b"\x00\x01 raw bytes after the switch\n")
        _reply(sock, timeout=1)
    except OSError:
        pass
    sock.close()
    time.sleep(0.3)
    assert b"raw bytes after the switch" not in raw_upstream.received


def test_an_option_that_would_open_ungoverned_tunnels_stops_the_start(tmp_path, confdir):
    # Every such option is checked in tests/test_tunnels.py; this one through a real start.
    rules = make_rules(tmp_path / "rules", upstreams=[{"host": "localhost"}])
    result = run_mitmdump(["-s", GATEWAY_SCRIPT, "--set", f"confdir={confdir}", "-p", "0", "--set",
                           f"gateway_rules={rules}", "--set", f"gateway_records={tmp_path / 'records'}",
                           "--set", "ignore_hosts=.*"], env=gateway_env(), timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "refuses options that would open tunnels nobody governs: ignore_hosts=" in output, output[-2000:]


def _mount_tmpfs(path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def _fill(directory) -> None:
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass


def test_a_full_audit_disk_refuses_new_tunnels_and_cuts_an_open_one(tmp_path, confdir, tunnel_rules,
                                                                     passthrough_host, tls_files):
    rules, tokens = tunnel_rules
    records = tmp_path / "records"
    audit_dir = records / "audit"
    _mount_tmpfs(audit_dir, "128k")  # the audit log gets its own small disk
    try:
        gateway = GatewayProcess(tmp_path / "gw", rules=rules, records=records, confdir=confdir,
                                 env=gateway_env()).start()
        client_tls = ssl.create_default_context(cafile=tls_files.ca_cert)
        try:
            sock, status, _, _ = _connect(gateway, "127.0.0.1", passthrough_host.port, tokens["carol"])
            assert status == 200
            open_tunnel = client_tls.wrap_socket(sock, server_hostname="127.0.0.1")
            open_tunnel.sendall(b"before the disk filled")
            assert _reply(open_tunnel, timeout=5) == b"before the disk filled"
            accepted_before = passthrough_host.accepted

            _fill(audit_dir)
            # A line may still fit in the audit file's last page; the first tunnel that does not is refused.
            statuses = []
            for _ in range(40):
                sock, status, _, body = _connect(gateway, "127.0.0.1", passthrough_host.port, tokens["carol"])
                sock.close()
                statuses.append(status)
                if status == 503:
                    assert json.loads(body)["error"]["code"] == "gateway_audit_unavailable"
                    break
            assert statuses[-1] == 503, statuses
            time.sleep(0.3)
            # Only the tunnels opened while an entry still fitted ever reached the host.
            assert passthrough_host.accepted - accepted_before <= statuses.count(200)

            # The tunnel already open is cut at its next chunk: those bytes never reach the host.
            open_tunnel.sendall(b"after the disk filled")
            assert not _reply(open_tunnel, timeout=5)
            open_tunnel.close()
            time.sleep(0.3)
            assert b"after the disk filled" not in passthrough_host.received

            (audit_dir / "filler").unlink()  # space again: the audit log resumes by itself, and tunnels open
            deadline, status = time.monotonic() + 10, None
            while status != 200 and time.monotonic() < deadline:
                time.sleep(0.3)
                sock, status, _, _ = _connect(gateway, "127.0.0.1", passthrough_host.port, tokens["carol"])
                sock.close()
            assert status == 200
        finally:
            gateway.stop()
        assert "cut: the audit log cannot write" in gateway.log()
        result = verify(records)
        assert not [f for f in result.findings if f.severity == "failed"], result.summary()
    finally:
        subprocess.run(["umount", str(audit_dir)], check=False)
