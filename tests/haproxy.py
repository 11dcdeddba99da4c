"""A real HAProxy (Debian's `haproxy`, which run_tests.sh installs when missing) in front of gateway instances on
127.0.0.1, with a configuration the test writes: HTTP mode, round robin, health checks, on a free port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)


def skip_reason() -> str | None:
    if haproxy_binary() is None:
        return "HAProxy is not installed: apt-get install haproxy (run_tests.sh does, as root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(port: int, backends: list[tuple[str, int]], backend_keep_alive: bool = False,
           threads: int | None = None, balance: str = "roundrobin") -> str:
    """backend_keep_alive: keep connections to the gateways open and reuse them for any client's requests (each
    request carries its own credentials), instead of a new connection per request, whose set-up costs a
    mitmproxy instance more CPU than the request itself (the benchmarks). threads: HAProxy's nbthread (default:
    one per core; one is plenty for a few thousand requests/s and spins less)."""
    servers = "\n".join(f"    server {name} 127.0.0.1:{backend_port} check inter 500ms fall 2 rise 1"
                        for name, backend_port in backends)
    nbthread = f"\n    nbthread {threads}" if threads else ""
    connections = "http-reuse always" if backend_keep_alive else "option http-server-close"
    # Long client/server timeouts: a request held for approval waits inside the gateway.
    return f"""global
    maxconn 2000{nbthread}

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    {connections}

frontend gateways
    bind 127.0.0.1:{port}
    default_backend instances

backend instances
    balance {balance}
{servers}
"""


class HAProxy:
    def __init__(self, workdir: Path, backends: list[tuple[str, int]], backend_keep_alive: bool = False,
                 threads: int | None = None, balance: str = "roundrobin") -> None:
        self.workdir, self.backends = workdir, backends
        self.backend_keep_alive, self.threads, self.balance = backend_keep_alive, threads, balance
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "HAProxy":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a free port may be taken by someone else before HAProxy binds it
            self.port = _free_port()
            path = self.workdir / "haproxy.cfg"
            path.write_text(config(self.port, self.backends, self.backend_keep_alive, self.threads, self.balance))
            log = open(self.workdir / "haproxy.log", "wb")
            self.proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(path)], stdout=log,
                                         stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"HAProxy did not start:\n{(self.workdir / 'haproxy.log').read_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
