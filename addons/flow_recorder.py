"""Records every exchange, refused ones included, in rotated mitmproxy flow files with credentials scrubbed."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from mitmproxy import ctx, exceptions, http, io

from addons.credentials import CREDENTIAL_METADATA_KEYS, remove_credential_headers
from addons.gateway_options import add_gateway_options, records_dir

logger = logging.getLogger(__name__)

FLOWS_SUBDIR = "flows"


class FlowRecorder:
    """Writes each finished flow, as the client saw it and without credentials, to <records>/flows/*.mitm."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self._file: BinaryIO | None = None
        self._writer: io.FlowWriter | None = None
        self._path: Path | None = None
        self._day: str | None = None
        self._seq = 0
        self._pending: list[tuple[io.FlowWriter, http.HTTPFlow]] = []
        self._drain_scheduled = False

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
            self._close()
            self.directory = directory

    def running(self) -> None:
        # Without this mitmproxy keeps no copy of a streamed body, and the record would lose it.
        ctx.options.update(store_streamed_bodies=True)

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
        self._drain()
        self._close()

    def record(self, flow: http.HTTPFlow) -> None:
        # Defence in depth: the addons before us already took credentials off; make sure.
        remove_credential_headers(flow.request.headers)
        for key in CREDENTIAL_METADATA_KEYS:
            flow.metadata.pop(key, None)
        # The file is chosen now, so later addons (the audit log) can name it in the flow's metadata.
        writer, path = self._current_writer()
        flow.metadata["auditgate.flow_file"] = path.name
        self._pending.append((writer, flow))
        # Serialising a flow costs ~0.3 ms of pure Python. Done inside the hook it would delay this
        # response; scheduled for the loop's next turn it runs once the response is on the wire
        # (mitmproxy sends it in the same step that finishes the hook), and flows that finish
        # together are written in one go.
        if not self._drain_scheduled:
            try:
                asyncio.get_running_loop().call_soon(self._drain)
                self._drain_scheduled = True
            except RuntimeError:  # no event loop (never the case inside mitmproxy): write now
                self._drain()

    def _drain(self) -> None:
        self._drain_scheduled = False
        pending, self._pending = self._pending, []
        try:
            for writer, flow in pending:
                writer.add(flow)
            if pending and self._file:
                self._file.flush()
        except OSError as e:
            logger.error("could not record %d flow(s) to %s: %s", len(pending), self.directory, e)

    @staticmethod
    def _now() -> datetime:
        return datetime.now(timezone.utc)

    def _current_writer(self) -> tuple[io.FlowWriter, Path]:
        now = self._now()
        day = now.strftime("%Y%m%d")
        too_big = self._file is not None and self._file.tell() >= ctx.options.gateway_flows_max_mb * 1024 * 1024
        if self._writer is None or day != self._day or too_big:
            self._drain()  # flows already assigned to the current file go there before it closes
            self._close()
            if self.directory is None:
                raise RuntimeError("the flow recorder has no records directory")
            self._seq += 1
            self._path = self.directory / f"flows-{now:%Y%m%dT%H%M%S}Z-{os.getpid()}-{self._seq:04d}.mitm"
            self._file = open(self._path, "ab")
            self._writer = io.FlowWriter(self._file)
            self._day = day
            logger.info("recording flows to %s", self._path)
        return self._writer, self._path

    def _close(self) -> None:
        if self._file:
            self._file.close()
        self._file, self._writer = None, None


addons = [FlowRecorder()]
