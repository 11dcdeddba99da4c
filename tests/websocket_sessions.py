"""What the WebSocket end-to-end tests share: a local ``websockets`` upstream running on its own thread, a
gateway in reverse mode in front of it, a raw client session through that gateway, and reading the events
the gateway answered and the audit entries it wrote."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.server import serve
from websockets.sync.client import connect

from tests.conftest import gateway_env, make_rules
from tests.gateway_process import GatewayProcess


class ThreadedWebSocketServer:
    """A ``websockets`` server on 127.0.0.1 (an ephemeral port) with its own event loop on a daemon thread.
    Subclasses say what a session does (``_session``) and may add options for ``serve`` (``serve_options``)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)

    def serve_options(self) -> dict:
        return {}

    async def _session(self, connection) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = self._loop.create_future()
        async with serve(self._session, "127.0.0.1", 0, ssl=self.ssl_context, max_size=None,
                         **self.serve_options()) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop


@dataclass
class WebSocketSetup:
    """A module's gateway in front of its WebSocket upstream, and alice's service token for it."""
    gateway: GatewayProcess
    upstream: ThreadedWebSocketServer
    rules: Path
    records: Path
    alice: str


def websocket_rules(directory: Path, upstream_port: int, host: str = "127.0.0.1") -> Path:
    """The shipped rules, with the WebSocket upstream at host:upstream_port as the one upstream."""
    return make_rules(directory, upstreams=[{"host": host, "port": upstream_port, "key_env": "OPENAI_API_KEY"}])


def ca_confdir(root: Path) -> Path:
    """A mitmproxy confdir below root whose CA exists before the gateway starts."""
    from mitmproxy.certs import CertStore

    confdir = root / "confdir"
    confdir.mkdir()
    CertStore.from_store(confdir, "mitmproxy", 2048)
    return confdir


def start_reverse_gateway(root: Path, rules: Path, upstream_port: int, records: Path,
                          args: list[str] = ()) -> GatewayProcess:
    """The bundle in reverse mode in front of the WebSocket upstream on 127.0.0.1:upstream_port."""
    return GatewayProcess(root / "gw", rules=rules, records=records, confdir=ca_confdir(root),
                          args=["--mode", f"reverse:http://127.0.0.1:{upstream_port}", *args],
                          env=gateway_env()).start()


def open_session(setup, path: str = "/v1/responses", token: str | None = None, headers=(), **kwargs):
    """A raw client session through ``setup.gateway`` as ``token`` (alice's by default); ``headers`` (a dict, or
    (name, value) pairs when a name comes twice) go with the upgrade, ``kwargs`` to ``connect``."""
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    return connect(f"ws://127.0.0.1:{setup.gateway.port}{path}", proxy=None, open_timeout=15, max_size=None,
                   additional_headers=[("authorization", f"Bearer {token or setup.alice}"), *pairs], **kwargs)


def events_until(connection, last: set[str], timeout: float = 15.0) -> list[dict]:
    """Events received until one whose type is in ``last`` (included); a message that is not a JSON object
    is kept as {"raw": text}."""
    events = []
    deadline = time.monotonic() + timeout
    while True:
        raw = connection.recv(timeout=max(0.1, deadline - time.monotonic()))
        try:
            event = json.loads(raw)
        except (ValueError, TypeError):
            event = None
        events.append(event if isinstance(event, dict) else {"raw": raw if isinstance(raw, str) else repr(raw)})
        if isinstance(event, dict) and event.get("type") in last:
            return events


def audit_entries(records: Path) -> list[dict]:
    """Every entry of the audit log's files below records/audit, as written so far (a torn last line left out)."""
    entries = []
    for path in sorted((records / "audit").rglob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                pass
    return entries


def fields_of(entry: dict) -> dict:
    return entry.get("fields") or entry


def events_of(records: Path, kind: str, flow_id: str | None = None, timeout: float = 10.0) -> list[dict]:
    """The audit entries of one kind (for one flow), once there is one or the timeout is up."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit_entries(records) if e.get("kind") == kind
                 and (flow_id is None or fields_of(e).get("flow_id") == flow_id)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
