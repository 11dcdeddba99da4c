"""`auditgate demo` (what ``./run_gateway.sh --demo`` runs): the demo upstream, then the gateway in reverse
mode in front of it (mitmweb, or mitmdump with --no-web), then what to try. Ctrl-C stops both.

Both run in sessions of their own, so the terminal's Ctrl-C reaches this process only, which stops the
gateway first (SIGINT to its process group: mitmproxy shuts down cleanly and the audit log ends on a
signed checkpoint) and the demo upstream after it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import auditgate
from auditgate.demo.setup import (
    UPSTREAM_KEY_ENV,
    DemoDirError,
    DemoLayout,
    fresh_demo_dir,
    instructions,
    make_demo_rules,
    new_upstream_key,
    write_env_file,
)

PROJECT_ROOT = Path(auditgate.__file__).resolve().parent.parent
GATEWAY_SCRIPT = PROJECT_ROOT / "addons" / "gateway.py"
BIN = Path(sys.executable).parent

_UPSTREAM_READY = re.compile(r"listening on (http://127\.0\.0\.1:(\d+))/v1")
_GATEWAY_READY = re.compile(r"export OPENAI_BASE_URL=(http://[^\s/]+)/v1")
_GATEWAY_HINT_END = re.compile(r"export OPENAI_API_KEY=")
_ADMIN = re.compile(r"approvals: admin API and approver page at (http://\S+)/approvals")
_WEB = re.compile(r"Web server listening at (http://\S+)")

START_TIMEOUT = 180.0  # the masking workers load Presidio (and spaCy with --ner) before the gateway serves


class _Stop(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: stop both processes."""


def _stop_signal(signum, frame) -> None:
    raise _Stop()


def _say(message: str, error: bool = False) -> None:
    """Print, unless the console is gone (a terminal closed, a pipe whose reader was stopped by the Ctrl-C)."""
    try:
        print(message, file=sys.stderr if error else sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


def port_or_free(preferred: int) -> int:
    """preferred if nothing listens on it on 127.0.0.1, else a free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


@dataclass
class _Output:
    """Echoes a child's output line by line and remembers what the demo waits for."""

    proc: subprocess.Popen
    echo: bool = True
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> _Output:
        self.thread = threading.Thread(target=self._pump, daemon=True, name="auditgate-demo-output")
        self.thread.start()
        return self

    def _pump(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if self.echo:
                try:
                    print(line, flush=True)
                except (OSError, ValueError):  # our stdout is gone (a closed pipe): keep draining the child's
                    self.echo = False
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("")  # wakes waiters at EOF
            self.changed.notify_all()

    def search(self, pattern: re.Pattern) -> re.Match | None:
        with self.changed:
            for line in self.lines:
                match = pattern.search(line)
                if match:
                    return match
        return None

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match | None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    match = pattern.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self.changed.wait(min(left, 0.5))


def _stop_process(proc: subprocess.Popen | None, name: str, grace: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _say(f"auditgate demo: {name} did not stop within {grace:g}s; killing it", error=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def _start_upstream(layout: DemoLayout, port: int, event_delay: float) -> tuple[subprocess.Popen, str]:
    with open(layout.upstream_log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "auditgate.demo.upstream", "--port", str(port), "--event-delay", str(event_delay)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    output = _Output(proc, echo=False).start()
    match = output.wait_for(_UPSTREAM_READY, 20)
    if match is None:
        _stop_process(proc, "the demo upstream", 5)
        raise RuntimeError(f"the demo upstream did not start; see {layout.upstream_log}")
    return proc, match.group(1)


def run_demo(*, directory: str, confdir: str, port: int | None, admin_port: int | None, web_port: int | None, web: bool,
             ner: bool, event_delay: float, mitmproxy_args: list[str]) -> int:
    tool = BIN / ("mitmweb" if web else "mitmdump")
    if not GATEWAY_SCRIPT.is_file() or not tool.exists():
        print(f"auditgate demo: needs the project checkout ({GATEWAY_SCRIPT}) and {tool}", file=sys.stderr)
        return 2
    if ner:
        import spacy.util

        from auditgate.demo.ner import MODEL

        if not spacy.util.is_package(MODEL):
            print(f"auditgate demo: the spaCy model package {MODEL} is not installed; "
                  "./run_gateway.sh --demo --ner installs it", file=sys.stderr)
            return 2
    try:
        layout = fresh_demo_dir(Path(directory))
    except (DemoDirError, OSError) as e:
        print(f"auditgate demo: {e}", file=sys.stderr)
        return 2

    previous = {s: signal.signal(s, _stop_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    upstream = gateway = output = None
    try:
        upstream, upstream_url = _start_upstream(layout, 0, event_delay)
        upstream_port = int(upstream_url.rsplit(":", 1)[1])
        identities = make_demo_rules(layout.rules, upstream_port)
        if ner:
            from auditgate.demo.ner import enable_person_masking

            outcome = enable_person_masking(layout.rules)
            for change in outcome.changes:
                _say(f"auditgate demo: {outcome.path}: {change}")

        listen = port if port is not None else port_or_free(8080)
        # The admin listener takes a free port unless one is asked for (the instructions carry its address).
        admin = admin_port if admin_port is not None else 0
        command = [
            str(tool), "-s", str(GATEWAY_SCRIPT),
            "--mode", f"reverse:{upstream_url}",
            "--set", f"confdir={confdir}", "--set", "listen_host=127.0.0.1", "--listen-port", str(listen),
            "--set", f"gateway_rules={layout.rules}", "--set", f"gateway_records={layout.records}",
            "--set", f"gateway_audit_key={layout.audit_key}",
            # Signed every 2 s, so `auditgate verify` finds the demo's flows signed a moment after they ended.
            "--set", "gateway_audit_checkpoint_seconds=2",
            "--set", f"approval_admin_listen=127.0.0.1:{admin}",
        ]
        if web:
            command += ["--set", "web_host=127.0.0.1", "--set",
                        f"web_port={web_port if web_port is not None else port_or_free(8081)}"]
        command += mitmproxy_args
        env = {**os.environ, UPSTREAM_KEY_ENV: new_upstream_key(), "PYTHONUNBUFFERED": "1"}
        _say(f"auditgate demo: demo upstream at {upstream_url}/v1; starting {tool.name} in front of it "
             "(takes a few seconds)")
        gateway = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
        output = _Output(gateway).start()
        ready = output.wait_for(_GATEWAY_READY, START_TIMEOUT)
        if ready is None:
            _say(f"auditgate demo: the gateway did not start (exit code {gateway.poll()})", error=True)
            return 1
        output.wait_for(_GATEWAY_HINT_END, 5)  # the gateway's own hint ends with this line
        web_url = None
        if web:
            found = output.wait_for(_WEB, 10)
            web_url = found.group(1) if found else None
        admin_found = output.wait_for(_ADMIN, 10)
        if admin_found is None:  # the gateway said why (e.g. the port is taken): held requests can only time out
            _say("auditgate demo: the approvals admin listener is not running; step (d) will not work", error=True)
        admin_url = admin_found.group(1) if admin_found else f"http://127.0.0.1:{admin}"
        gateway_url = ready.group(1)
        write_env_file(layout.env_file, gateway_url, admin_url, identities)
        time.sleep(0.5)  # mitmweb's browser lines come a moment later: print the instructions after them
        _say(instructions(layout, gateway_url=gateway_url, upstream_url=upstream_url, admin_url=admin_url,
                          web_url=web_url, identities=identities, python=_rel_bin("python"),
                          auditgate=_rel_bin("auditgate"), ner=ner))
        while True:
            if gateway.poll() is not None:
                _say(f"auditgate demo: the gateway exited ({gateway.returncode})", error=True)
                return 1
            if upstream.poll() is not None:
                _say(f"auditgate demo: the demo upstream exited ({upstream.returncode}); see {layout.upstream_log}",
                     error=True)
                return 1
            time.sleep(0.5)
    except _Stop:
        _say("\nauditgate demo: stopping the gateway and the demo upstream")
        return 0
    except Exception as e:  # noqa: BLE001 (a start-up failure: say what, stop what was started)
        _say(f"auditgate demo: {e}", error=True)
        return 1
    finally:
        # A second Ctrl-C (or a SIGTERM) while stopping must not leave a process behind.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        _stop_process(gateway, "the gateway", 20)
        _stop_process(upstream, "the demo upstream", 5)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if output is not None:
            output.thread.join(5)  # the gateway's last lines
        if gateway is not None:
            _say(f"auditgate demo: stopped. The demo's records stay in {layout.records} until the next demo start.")


def _rel_bin(name: str) -> str:
    """The venv's command as the newcomer types it (.venv/bin/NAME from the project directory)."""
    path = BIN / name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
