"""Records every exchange, refused ones included, in rotated mitmproxy flow files with credentials scrubbed."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from auditgate.core.credentials import (
    CREDENTIAL_METADATA_KEYS,
    remove_credential_headers,
)
from auditgate.core.flow_contract import FLOW_FILE
from auditgate.core.options import add_gateway_options, records_dir
from auditgate.recording.writer import FlowFileWriter, flow_state

logger = logging.getLogger("auditgate.addons.flow_recorder")

FLOWS_SUBDIR = "flows"
FLUSH_SECONDS = 0.05
FLUSH_BYTES = 256 * 1024


class FlowRecorder:
    """Writes each finished flow, as the client saw it and without credentials, to <records>/flows/*.mitm."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self._writer = FlowFileWriter()
        self._path: Path | None = None
        self._bytes = 0  # handed to the writer for the current file
        self._day: str | None = None
        self._seq = 0
        self._pending: list[tuple[Path, http.HTTPFlow]] = []  # finished, state not yet taken
        self._drain_scheduled = False
        self._batch: list[tuple[str, dict]] = []  # states taken, not yet handed to the writer
        self._batch_bytes = 0
        self._flush_timer: asyncio.TimerHandle | None = None

    def load(self, loader) -> None:
        add_gateway_options(loader)
        loader.add_option(
            "gateway_flows_max_mb", int, 100, "Start a new flow file once the current one reaches this many megabytes."
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_flows_max_mb" in updated and ctx.options.gateway_flows_max_mb < 1:
            raise exceptions.OptionsError("auditgate: gateway_flows_max_mb must be at least 1")
        if "gateway_records" in updated:
            directory = records_dir() / FLOWS_SUBDIR
            try:
                directory.mkdir(parents=True, exist_ok=True)
                if not os.access(directory, os.W_OK):
                    raise PermissionError(f"{directory} is not writable")
            except OSError as e:
                raise exceptions.OptionsError(f"auditgate: gateway_records={ctx.options.gateway_records!r}: {e}") from None
            self._write_out()
            self._path = None
            self.directory = directory

    def running(self) -> None:
        # Without this mitmproxy keeps no copy of a streamed body, and the record would lose it.
        ctx.options.update(store_streamed_bodies=True)
        self._writer.start()  # now rather than on the first flow, which would wait for the spawn

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # A refused CONNECT (forward mode, host not served) never reaches the response hook.
        if flow.live and flow.response and flow.response.status_code >= 400:
            self.record(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self.record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self.record(flow)

    def done(self) -> None:
        self._write_out()
        self._writer.close()

    def record(self, flow: http.HTTPFlow) -> None:
        # Defence in depth: the addons before us already took credentials off; make sure.
        remove_credential_headers(flow.request.headers)
        for key in CREDENTIAL_METADATA_KEYS:
            flow.metadata.pop(key, None)
        # The file is chosen now, so later addons (the audit log) can name it in the flow's metadata.
        path = self._current_path()
        FLOW_FILE.set(flow, path.name)
        self._pending.append((path, flow))
        # Taking a flow's state costs ~0.2 ms. Done inside the hook it would delay this response;
        # scheduled for the loop's next turn it runs once the response is on the wire (mitmproxy
        # sends it in the same step that finishes the hook).
        if not self._drain_scheduled:
            try:
                asyncio.get_running_loop().call_soon(self._drain)
                self._drain_scheduled = True
            except RuntimeError:  # no event loop (never the case inside mitmproxy): write now
                self._write_out()

    def _write_out(self) -> None:
        """Everything pending, to the writer now."""
        self._drain()
        self._flush()

    def _drain(self) -> None:
        self._drain_scheduled = False
        pending, self._pending = self._pending, []
        for path, flow in pending:
            self._batch.append((str(path), flow_state(flow)))
            self._batch_bytes += len(flow.request.raw_content or b"") + len(
                flow.response.raw_content or b"" if flow.response else b"") + 2048
        # Each hand-over wakes the writer process, which costs this process more than the pickling:
        # batches go over every FLUSH_SECONDS or once they are big. A flow reaches its file at most
        # that much later; on shutdown everything is written first.
        if self._batch_bytes >= FLUSH_BYTES:
            self._flush()
        elif self._batch and self._flush_timer is None:
            try:
                self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush)
            except RuntimeError:
                self._flush()

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not batch:
            return
        try:
            size = self._writer.write(batch)
        except OSError as e:
            logger.error("could not record %d flow(s) to %s: %s", len(batch), self.directory, e)
            return
        current = str(self._path)
        self._bytes += size * sum(path == current for path, _ in batch) // len(batch)

    @staticmethod
    def _now() -> datetime:
        return datetime.now(timezone.utc)

    def _current_path(self) -> Path:
        now = self._now()
        day = now.strftime("%Y%m%d")
        too_big = self._bytes >= ctx.options.gateway_flows_max_mb * 1024 * 1024
        if self._path is None or day != self._day or too_big:
            self._write_out()  # flows already assigned to the current file go there first
            if self.directory is None:
                raise RuntimeError("the flow recorder has no records directory")
            self._seq += 1
            self._path = self.directory / f"flows-{now:%Y%m%dT%H%M%S}Z-{os.getpid()}-{self._seq:04d}.mitm"
            self._bytes = 0
            self._day = day
            logger.info("recording flows to %s", self._path)
        return self._path


addons = [FlowRecorder()]
