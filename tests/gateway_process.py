"""Starts a real mitmdump with the auditgate bundle as a subprocess and finds the port it listens on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MITMDUMP = str(BIN / "mitmdump")
GATEWAY_SCRIPT = str(ROOT / "addons" / "gateway.py")

_LISTEN = re.compile(r"export (?:HTTPS_PROXY|OPENAI_BASE_URL)=http://127\.0\.0\.1:(\d+)")


class GatewayProcess:
    def __init__(self, workdir: Path, *, rules: Path, records: Path, confdir: Path, args: list[str] = (),
                 env: dict[str, str] | None = None, script: str = GATEWAY_SCRIPT) -> None:
        self.workdir = workdir
        self.rules, self.records, self.confdir = rules, records, confdir
        self.args = list(args)
        self.env = env or {}
        self.script = script
        self.log_path = workdir / f"mitmdump-{int(time.time() * 1000)}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def command(self) -> list[str]:
        return [MITMDUMP, "-s", self.script, "--set", f"confdir={self.confdir}", "--set", "listen_host=127.0.0.1",
                "-p", "0", "--set", f"gateway_rules={self.rules}", "--set", f"gateway_records={self.records}",
                "--set", "termlog_verbosity=info", *self._default_admin_listen(), *self.args]

    def _default_admin_listen(self) -> list[str]:
        # Gateways started side by side must not race for the default admin port. Only when args do not set
        # it: mitmdump given the same --set twice stalls at start without a word.
        if any(a.startswith("approval_admin_listen=") for a in self.args):
            return []
        return ["--set", "approval_admin_listen=127.0.0.1:0"]

    def start(self, timeout: float = 30.0) -> "GatewayProcess":
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        env.update(self.env)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTEN.search(self.log())
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mitmdump did not start within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()


def run_mitmdump(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    full_env.update(env or {})
    return subprocess.run([MITMDUMP, *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=timeout)
