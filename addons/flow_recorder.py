"""Records every exchange, refused ones included, in rotated mitmproxy flow files with credentials scrubbed.

Fails closed without making responses wait for the disk: flows are written by a child process after
their response went out, and the child answers each batch. While recording fails (the disk refused a
batch, the writer process died or stopped answering, or too much waits for it) new requests are
refused with 503 gateway_records_unavailable and replies not yet sent are withheld; every flow whose
record was lost anyway is named in the audit log ("records_lost"), so the verifier can tell a loss
the gateway reported from a record removed afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import date, datetime, timezone
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from auditgate.core.credentials import (
    CREDENTIAL_METADATA_KEYS,
    remove_credential_headers,
)
from auditgate.core.flow_contract import FLOW_FILE, REFUSAL, services
from auditgate.core.options import add_gateway_options, records_dir
from auditgate.core.private_files import (
    describe_tightened,
    private_dir,
    tighten,
    tighten_tree,
)
from auditgate.core.refusal import is_answered, refuse
from auditgate.recording.writer import (
    FlowFileWriter,
    LostRecord,
    Outcome,
    describe,
    flow_record,
)
from auditgate.websocket import session, session_control
from auditgate.websocket.audio import MODES as AUDIO_MODES
from auditgate.websocket.audio import recorded_form

logger = logging.getLogger("auditgate.addons.flow_recorder")

FLOWS_SUBDIR = "flows"
FLUSH_SECONDS = 0.05
FLUSH_BYTES = 256 * 1024
UNAVAILABLE_CODE = "gateway_records_unavailable"
LOST_EVENT = "records_lost"
HEALTH_SECONDS = 0.25  # how often a failing recorder checks whether it can record again
STALL_SECONDS = 5.0  # a writer that has not answered a batch for this long is failing
MAX_LOST_IDS = 10_000  # lost flows named per report; more are counted
SHUTDOWN_SESSIONS_SECONDS = 3.0  # how long shutdown waits for the WebSocket sessions it closes to end
# mitmproxy's own flow writers: a second copy of every flow, outside the records the audit log vouches for,
# in files mitmproxy opens under the process's umask. Refused while the proxy serves.
UNGOVERNED_WRITERS = ("save_stream_file", "hardump")


class FlowRecorder:
    """Writes each finished flow, as the client saw it and without credentials, to <records>/flows/*.mitm."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self._writer = FlowFileWriter(self._on_outcome)
        self._path: Path | None = None
        self._bytes = 0  # handed to the writer for the current file
        self._day: date | None = None  # the UTC day of the current file
        self._seq = 0
        self._pending: list[tuple[int, Path, http.HTTPFlow]] = []  # (number, file, flow): state not yet taken
        self._recorded = 0  # flows given to record(): each one's number
        self._batch: list[tuple[str, str, bytes]] = []  # (path, flow id, record) encoded, not yet handed over
        self._batch_bytes = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        # Why recording fails now, by cause ("disk", "writer", "queue"); new requests are refused while any is set.
        self.failing: dict[str, str] = {}
        self._refused_while_failing = 0
        self._probe_outstanding = False
        self._lost: list[LostRecord] = []  # lost, not yet in the audit log
        self._lost_uncounted = 0  # lost beyond MAX_LOST_IDS: only counted
        self._task: asyncio.Task | None = None
        self._sessions: dict[str, http.HTTPFlow] = {}  # WebSocket sessions open now: recorded at shutdown too
        # Flows whose record is not settled yet: taken, but neither written (the writer's answer) nor lost (and
        # reported). The audit log names the first such flow's entry in each checkpoint (see `unsettled`).
        self._unsettled: set[str] = set()

    def load(self, loader) -> None:
        add_gateway_options(loader)
        loader.add_option(
            "gateway_flows_max_mb", int, 100, "Start a new flow file once the current one reaches this many megabytes."
        )
        loader.add_option(
            "gateway_flows_queue_mb", int, 64,
            "Refuse new requests (503 gateway_records_unavailable) while more than this many megabytes of flows "
            "wait for the flow file writer; twice as much and further records are dropped (and reported lost).",
        )
        loader.add_option(
            "gateway_websocket_audio", str, "digest",
            "How WebSocket audio payloads (base64 in input_audio_buffer.append, response.output_audio.delta, "
            "input_audio parts) are recorded: digest (their size and SHA-256 in place of the sound; forwarded "
            "unchanged) or keep.",
        )

    def configure(self, updated: set[str]) -> None:
        for name in ("gateway_flows_max_mb", "gateway_flows_queue_mb"):
            if name in updated and getattr(ctx.options, name) < 1:
                raise exceptions.OptionsError(f"auditgate: {name} must be at least 1")
        if "gateway_websocket_audio" in updated and ctx.options.gateway_websocket_audio not in AUDIO_MODES:
            raise exceptions.OptionsError(f"auditgate: gateway_websocket_audio must be one of {', '.join(AUDIO_MODES)}")
        if updated & {*UNGOVERNED_WRITERS, "server"}:
            self._refuse_ungoverned_writers()
        if "gateway_records" in updated:
            directory = records_dir() / FLOWS_SUBDIR
            try:
                private_dir(directory)  # 0700, the records directory too if it is made here
                if not os.access(directory, os.W_OK):
                    raise PermissionError(f"{directory} is not writable")
                # What an earlier run left under a looser umask (or an older release) is made private now.
                tightened = [records_dir()] if tighten(records_dir()) else []
                tightened += tighten_tree(directory, root_shared_ok=True)  # flows/ is the gateway's by its name
            except OSError as e:
                raise exceptions.OptionsError(f"auditgate: gateway_records={ctx.options.gateway_records!r}: {e}") from None
            if tightened:
                logger.warning("made records private (files 0600, directories 0700) that other users could read: %s",
                               describe_tightened(tightened, records_dir()))
            self._write_out()
            self._path = None
            self.directory = directory

    @staticmethod
    def _refuse_ungoverned_writers() -> None:
        """save_stream_file (-w) and hardump write every flow a second time, beside the records: not digested in
        the audit log, not scrubbed again, in files of the umask's mode. Reading flow files offline (-n -r ...
        -w) serves nobody: allowed."""
        given = [f"{name}={getattr(ctx.options, name)}" for name in UNGOVERNED_WRITERS if getattr(ctx.options, name)]
        if given and ctx.options.server:
            raise exceptions.OptionsError(
                f"auditgate refuses {', '.join(given)}: the gateway records every flow itself under gateway_records "
                "(files 0600, credentials removed, each digested in the audit log); mitmproxy's own flow writers "
                "would keep a second copy outside those records. Read the records with mitmproxy -r instead")

    def unsettled(self, flow_id: str) -> bool:
        """True while the flow's record is on its way to its file (not written yet, nor reported lost).

        A crash now loses it: the audit log's checkpoints say from which flow entry on records may still be
        on their way (``records_pending_from``), so that the verifier tells such a loss from tampering."""
        return flow_id in self._unsettled

    def running(self) -> None:
        services.flow_records = self
        # Without this mitmproxy keeps no copy of a streamed body, and the record would lose it.
        ctx.options.update(store_streamed_bodies=True)
        self._writer.start()  # now rather than on the first flow, which would wait for the spawn
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch_health())

    # ---- flows ------------------------------------------------------------------------------------------
    def request(self, flow: http.HTTPFlow) -> None:
        if self.failing and flow.live and not is_answered(flow):
            self._refused_while_failing += 1
            refuse(flow, 503, UNAVAILABLE_CODE,
                   "the gateway cannot record requests right now, so it serves none until it can")

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # A refused CONNECT (forward mode, host not served) never reaches the response hook.
        if flow.live and flow.response and flow.response.status_code >= 400:
            self.record(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self._withhold_while_failing(flow)
            if flow.websocket is not None and flow.response is not None and flow.response.status_code == 101:
                return  # a WebSocket session: recorded with its messages at its end (websocket_end)
            self.record(flow)

    # ---- WebSocket sessions: recorded at their end, with their (masked) messages ----------------------
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self._sessions[flow.id] = flow

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if self.failing and not session.record(flow).get("failed"):
            # The session's record cannot be written: its messages are not passed on unrecorded.
            session_control.fail(flow, "flow_recorder", "records unavailable")
            return
        self._digest_audio(flow, upto=len(flow.websocket.messages) - 1)  # those before the latest left already

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._sessions.pop(flow.id, None)
        rec = session.record(flow)
        if rec.get("recorded"):
            return  # ended by the gateway at its shutdown, and seen ending again as the process exits
        rec["recorded"] = True
        rec.pop("expand", None)
        self._digest_audio(flow, upto=len(flow.websocket.messages))
        _omit_undelivered(flow)
        self.record(flow)
    @staticmethod
    def _digest_audio(flow: http.HTTPFlow, upto: int) -> None:
        """Audio payloads of messages already forwarded, replaced by their size and digest in the flow (the record)."""
        if ctx.options.gateway_websocket_audio == "keep":
            return
        rec = session.record(flow)
        messages = flow.websocket.messages
        for message in messages[rec.get("audio_from", 0):upto]:
            if message.is_text:
                recorded = recorded_form(message.content)
                if recorded is not None:
                    message.content = recorded
        rec["audio_from"] = max(rec.get("audio_from", 0), upto)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self.record(flow)

    def done(self):
        if self._sessions:
            return self._done_after_sessions()  # awaited by mitmproxy
        self._close_writer()
        return None

    async def _done_after_sessions(self) -> None:
        # Before the writer closes, and before the audit log (after this addon) closes: sessions still open are
        # ended (1001), so each is recorded, with its audit entries, as any session at its end.
        open_sessions = list(self._sessions.values())
        for flow in open_sessions:
            session.record(flow)["ended_by"] = "gateway_shutdown"
        logger.info("ending %d WebSocket session(s) still open at shutdown", len(open_sessions))
        try:
            await session_control.end_at_shutdown(open_sessions, SHUTDOWN_SESSIONS_SECONDS)
        except Exception as e:
            logger.error("ending the WebSocket sessions open at shutdown failed: %s", describe(e), exc_info=True)
        for flow in list(self._sessions.values()):  # not ended even so: their messages so far are recorded
            self.websocket_end(flow)
        self._close_writer()

    def _close_writer(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._write_out()
        self._writer.close()  # every answer is in: the losses among them are reported below
        self._report_lost()
        if services.flow_records is self:
            services.flow_records = None
        if self._lost or self._lost_uncounted:
            logger.error("%d lost flow record(s) could not be reported in the audit log",
                         len(self._lost) + self._lost_uncounted)

    def _withhold_while_failing(self, flow: http.HTTPFlow) -> None:
        """A reply not sent yet, of a flow admitted before recording failed, is refused rather than sent unrecorded."""
        response = flow.response
        if (self.failing and response is not None and not response.stream and REFUSAL.get(flow) is None
                and flow.request.method != "CONNECT"):
            self._refused_while_failing += 1
            refuse(flow, 503, UNAVAILABLE_CODE, "the gateway could not record this request, so its reply was withheld")

    def record(self, flow: http.HTTPFlow) -> None:
        # Defence in depth: the addons before us already took credentials off; make sure.
        remove_credential_headers(flow.request.headers)
        for key in CREDENTIAL_METADATA_KEYS:
            flow.metadata.pop(key, None)
        # The file is chosen now, so later addons (the audit log) can name it in the flow's metadata.
        path = self._current_path()
        FLOW_FILE.set(flow, path.name)
        self._recorded += 1
        self._pending.append((self._recorded, path, flow))
        self._unsettled.add(flow.id)
        # Encoding a flow's record (and the audit log's digest of it) costs ~0.3 ms. Done inside the hook it
        # would delay this response; it runs once the response is on the wire, two turns of the loop on:
        # mitmproxy runs a flow's hooks in a task it starts eagerly, inside its handling of the data that
        # ended the response, and the hook task waits for that handling to end (a lock) before it sends the
        # response, on a later turn than callbacks scheduled meanwhile; one turn on, this would run first.
        # (Where the reply waits on something, gateway_audit_fsync=entry's fsync, this runs during that wait.)
        # Each flow has a drain of its own, which takes the flows recorded up to it: none before its reply.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (never the case inside mitmproxy): write now
            self._write_out()
            return
        loop.call_soon(loop.call_soon, self._drain, self._recorded)

    def _write_out(self) -> None:
        """Everything pending, to the writer now."""
        self._drain()
        self._flush()

    def _drain(self, upto: int | None = None) -> None:
        """Takes the records of the flows pending up to number `upto` (all of them: None)."""
        due = len(self._pending) if upto is None else next(
            (i for i, (number, _, _) in enumerate(self._pending) if number > upto), len(self._pending))
        pending, self._pending = self._pending[:due], self._pending[due:]
        for _, path, flow in pending:
            audit = services.audit_events
            if audit is not None:
                # The audit log's record entry (the digest of what this record holds) goes first: a record
                # never reaches its file before the log commits to it. The log fails closed on its own.
                try:
                    audit.record_taken(flow)
                except Exception as e:  # a bug there: the record is still written, and verify names the gap
                    logger.error("the audit log's record entry of flow %s failed: %s", flow.id, describe(e))
            try:
                record = flow_record(flow)  # encoded here: the writer process only appends bytes
            except Exception as e:  # the flow is lost, not the batch: said so below
                self._take_lost([LostRecord(flow.id, path.name, f"it cannot be encoded ({describe(e)})")])
                continue
            self._batch.append((str(path), flow.id, record))
            self._batch_bytes += len(record)
        # Each hand-over wakes the writer process, which costs more than the bytes it carries:
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
        limit = self._queue_limit()
        if self._writer.queued_bytes > 2 * limit:
            # Memory stays bounded: past twice the limit records are dropped, each one reported.
            self._take_lost([LostRecord(flow_id, os.path.basename(path), "the flow file writer's queue was full")
                             for path, flow_id, _ in batch])
            return
        self._writer.submit(batch)
        if self._writer.queued_bytes > limit:
            self._set_failing("queue", f"{self._writer.queued_bytes // (1024 * 1024)} MB of flows wait for the "
                                       "flow file writer")
        current = str(self._path)
        self._bytes += sum(len(record) for path, _, record in batch if path == current)

    @staticmethod
    def _queue_limit() -> int:
        try:
            return ctx.options.gateway_flows_queue_mb * 1024 * 1024
        except (AttributeError, KeyError):  # loaded without its options (a unit test)
            return 64 * 1024 * 1024

    @staticmethod
    def _now() -> datetime:
        return datetime.now(timezone.utc)

    def _current_path(self) -> Path:
        now = self._now()
        day = now.date()  # not strftime: ~3 us of every flow
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

    # ---- health: what the writer answers, and getting back to recording ------------------------------------
    def _on_outcome(self, outcome: Outcome) -> None:
        self._unsettled.difference_update(outcome.written)
        if outcome.probe or outcome.ended:
            self._probe_outstanding = False
        if outcome.lost:
            self._take_lost(outcome.lost)
        if outcome.error:
            self._set_failing("writer" if outcome.ended else "disk", outcome.error)
            if outcome.ended:
                self._probe()  # starts the next writer, and proves it works before flows are admitted again
        elif outcome.answered:
            # Any answer shows a live writer. Only a probe clears a disk error: it writes PROBE_BYTES, so
            # a disk with room for one small record but not the next does not let traffic flap back in.
            self._clear_failing("writer", *(("disk",) if outcome.probe else ()))

    def _set_failing(self, cause: str, reason: str) -> None:
        if not self.failing:
            logger.error("recording flows failed, refusing new requests with 503 %s: %s", UNAVAILABLE_CODE, reason)
            self._refused_while_failing = 0
        if cause == "disk" and cause not in self.failing:
            self._path = None  # the next flows go to a new file: a fault of this one file ends there
        self.failing[cause] = reason

    def _clear_failing(self, *causes: str) -> None:
        if not self.failing:
            return
        for cause in causes:
            self.failing.pop(cause, None)
        if not self.failing:
            logger.warning("recording flows again after refusing %d request(s); serving again",
                           self._refused_while_failing)

    def _probe(self) -> None:
        if self._probe_outstanding:
            return
        directory = self._path.parent if self._path is not None else self.directory
        if directory is not None:
            self._writer.probe(str(directory))
            self._probe_outstanding = True

    def check_health(self) -> None:
        """What the periodic task does: notice a stalled writer, try to record again, report losses."""
        if self._writer.oldest_unanswered_age() > STALL_SECONDS:
            self._set_failing("writer", f"the flow file writer has not answered for over {STALL_SECONDS:g} s")
        if "queue" in self.failing and self._writer.queued_bytes < self._queue_limit() // 2:
            self._clear_failing("queue")
        if "disk" in self.failing or "writer" in self.failing:
            self._writer.start()
            self._probe()
        if self._lost or self._lost_uncounted:
            self._report_lost()

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_SECONDS)
            try:
                self.check_health()
            except Exception as e:  # the watch must outlive any one failure, and say so
                logger.error("checking the flow recorder's health failed: %s", describe(e), exc_info=True)

    # ---- losses, into the audit log --------------------------------------------------------------------------
    def _take_lost(self, records: list[LostRecord]) -> None:
        self._unsettled.difference_update(r.flow_id for r in records)  # settled: lost, and reported below
        reasons = sorted({r.reason for r in records})
        logger.error("the records of %d flow(s) were lost (%s): %s", len(records),
                     ", ".join(r.flow_id for r in records[:5]) + (" ..." if len(records) > 5 else ""), "; ".join(reasons))
        room = MAX_LOST_IDS - len(self._lost)
        self._lost.extend(records[:max(0, room)])
        self._lost_uncounted += max(0, len(records) - max(0, room))
        self._report_lost()

    def _report_lost(self) -> None:
        events = services.audit_events
        if events is None or not (self._lost or self._lost_uncounted):
            return  # without the audit log (the recorder loaded alone) the gateway's log is all there is
        by_reason: dict[str, list[LostRecord]] = {}
        for record in self._lost:
            by_reason.setdefault(record.reason, []).append(record)
        for reason, records in by_reason.items():
            fields = {"reason": reason, "count": len(records),
                      "flows": [{"flow_id": r.flow_id, "flow_file": r.flow_file} for r in records]}
            if self._lost_uncounted:
                fields["unnamed"] = self._lost_uncounted  # lost too, beyond what one report names
            try:
                events.append_event(LOST_EVENT, fields)
            except Exception as e:  # the audit log refuses requests itself meanwhile; tried again later
                logger.error("the audit log could not take the report of %d lost flow record(s) yet: %s",
                             len(records), describe(e))
                return
            self._lost = [r for r in self._lost if r.reason != reason]
            self._lost_uncounted = 0


def _omit_undelivered(flow: http.HTTPFlow) -> None:
    """The record holds what the client got: a server message the client did not get (one the gateway sent
    again in its place or with its held tail first, one dropped as the session closed on a failure, which
    may be raw) keeps its place, marked dropped, without its content."""
    for message in flow.websocket.messages:
        if not message.from_client and message.dropped and not message.content.startswith(OMITTED_PREFIX):
            message.content = OMITTED_PREFIX + b'"not passed on"}'


OMITTED_PREFIX = b'{"omitted":'


addons = [FlowRecorder()]
