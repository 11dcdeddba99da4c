"""Sends every signed checkpoint of the audit log to one or more witnesses outside the records directory.

It follows the audit files the audit_log addon writes (complete lines only) and sends each checkpoint
entry to every witness of `gateway_witness`. At start it refuses to run (OptionsError) when a witness it
can read holds a checkpoint the log no longer has, or another entry at that seq: the records were cut or
an older copy restored. While no witness has taken the checkpoints of the last `gateway_witness_max_lag`
seconds, requests are refused with 503 gateway_witness_unavailable and the outage is written to the
audit log (`witness_unavailable`, then `witness_resumed`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from mitmproxy import ctx, exceptions, http

from auditgate.audit.chain import AUDIT_SUBDIR
from auditgate.audit.errors import describe
from auditgate.audit.witness import (
    CheckpointFollower,
    WitnessError,
    parse_witnesses,
    read_log_facts,
    start_check,
    witness_record,
)
from auditgate.core.flow_contract import AuditUnavailable, services
from auditgate.core.options import add_gateway_options, instance_id, records_dir
from auditgate.core.refusal import is_answered, refuse

logger = logging.getLogger("auditgate.addons.audit_witness")

UNAVAILABLE_CODE = "gateway_witness_unavailable"
POLL_SECONDS = 0.5
MAX_PENDING = 1000  # per witness; the newest checkpoint is what matters, older ones are history
DONE_SEND_SECONDS = 5.0


class _Outbox:
    """One witness and the records not yet accepted by it."""

    def __init__(self, witness) -> None:
        self.witness = witness
        self.pending: collections.deque[tuple[float, dict]] = collections.deque(maxlen=MAX_PENDING)
        self.error: str | None = None

    def oldest(self) -> float | None:
        return self.pending[0][0] if self.pending else None

    def send_pending(self) -> None:
        """In a thread: send in order, stop at the first failure (kept for the next try)."""
        while self.pending:
            try:
                self.witness.send(self.pending[0][1])
            except WitnessError as e:
                self.error = str(e)
                return
            except Exception as e:  # a bug or an odd error of a library: the witness counts as unreachable
                self.error = describe(e)
                return
            self.pending.popleft()
            self.error = None


class AuditWitness:
    def __init__(self) -> None:
        self.outboxes: list[_Outbox] = []
        self.follower: CheckpointFollower | None = None
        self.unavailable: str | None = None
        self._unavailable_since: float | None = None
        self._refused = 0
        self._task: asyncio.Task | None = None
        self._records: str = ""

    def load(self, loader) -> None:
        add_gateway_options(loader)
        loader.add_option(
            "gateway_witness", str, "",
            "Witnesses of the audit log's signed checkpoints, outside the records directory, comma-separated: "
            "dir:/path (a second directory), http(s)://… (JSON POST; read back with GET ?log_id=), syslog:, "
            "syslog:/socket or syslog:host:port (UDP). Empty: none (verify then cannot check the log's tail).",
        )
        loader.add_option(
            "gateway_witness_max_lag", int, 60,
            "Refuse requests (503 gateway_witness_unavailable) once no witness has taken the checkpoints of this "
            "many seconds.",
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_witness_max_lag" in updated and ctx.options.gateway_witness_max_lag < 1:
            raise exceptions.OptionsError("auditgate: gateway_witness_max_lag must be at least 1")
        if not updated & {"gateway_witness", "gateway_records"}:
            return
        try:
            witnesses = parse_witnesses(ctx.options.gateway_witness)
        except ValueError as e:
            raise exceptions.OptionsError(f"auditgate: gateway_witness: {e}") from None
        self.outboxes, self.follower = [], None
        self.unavailable, self._unavailable_since = None, None
        if not witnesses:
            return
        records = records_dir().expanduser().absolute()
        try:
            facts = read_log_facts(records)
        except OSError as e:
            raise exceptions.OptionsError(f"auditgate: gateway_witness: cannot read the audit log: {describe(e)}") from None
        problems = start_check(witnesses, facts)
        if problems:
            raise exceptions.OptionsError(
                f"auditgate: refusing to start on the audit log in {records / AUDIT_SUBDIR}: " + "; ".join(problems)
                + ". If the records were cut or an older copy restored, put the newest copy back (`auditgate verify "
                "--witness` shows what is missing); a log meant to start over needs a new witness (gateway_witness)."
            )
        self._records = str(records)
        self.follower = CheckpointFollower(records / AUDIT_SUBDIR, from_end=True)
        self.follower.log_id = facts.log_id
        self.outboxes = [_Outbox(w) for w in witnesses]
        if facts.last_checkpoint is not None and facts.log_id is not None:
            # The newest checkpoint already on disk: a witness added since, or one the last run could not reach.
            self._queue(*facts.last_checkpoint, time.monotonic())
        logger.info("audit witnesses: %s", ", ".join(o.witness.source for o in self.outboxes))

    def _queue(self, file: str, checkpoint: dict, now: float) -> None:
        record = witness_record(checkpoint, self.follower.log_id, instance_id(), self._records, file)
        for outbox in self.outboxes:
            outbox.pending.append((now, record))

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow_forever())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if not self.outboxes:
            return
        # The audit log (before this addon) has written its shutdown checkpoint: send it, bounded in time.
        try:
            self._collect(time.monotonic())
            deadline = time.monotonic() + DONE_SEND_SECONDS
            for outbox in self.outboxes:
                if time.monotonic() < deadline:
                    outbox.send_pending()
                if outbox.pending:
                    logger.error("witness %s did not take the last checkpoint: %s", outbox.witness.source, outbox.error)
        except Exception as e:
            logger.error("could not send the last checkpoint to the witnesses: %s", describe(e))

    async def _follow_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.tick()
            except Exception as e:  # this task must outlive any error; an unsent checkpoint ages into a refusal
                logger.error("the audit witness tick failed: %s", describe(e), exc_info=True)

    def _collect(self, now: float) -> None:
        if self.follower is None:
            return
        for file, checkpoint in self.follower.poll():
            if self.follower.log_id is not None:
                self._queue(file, checkpoint, now)

    async def tick(self) -> None:
        now = time.monotonic()
        await asyncio.to_thread(self._collect, now)
        for outbox in self.outboxes:
            if outbox.pending:
                await asyncio.to_thread(outbox.send_pending)
        self._update_state(time.monotonic())

    def _update_state(self, now: float) -> None:
        """Unavailable while every witness holds a checkpoint older than the bound it could not take."""
        if not self.outboxes:
            return
        bound = ctx.options.gateway_witness_max_lag
        overdue = [o for o in self.outboxes if o.oldest() is not None and now - o.oldest() > bound]
        if len(overdue) == len(self.outboxes):
            if not self.unavailable:
                self.unavailable = "; ".join(f"{o.witness.source}: {o.error or 'not answering'}" for o in overdue)
                self._unavailable_since = time.time()
                logger.error("no audit witness has taken a checkpoint for %d s, refusing requests with 503 %s: %s",
                             bound, UNAVAILABLE_CODE, self.unavailable)
                self._record("witness_unavailable", {"max_lag_seconds": bound, "witnesses": [
                    {"witness": o.witness.source, "error": o.error, "unsent_checkpoints": len(o.pending)}
                    for o in self.outboxes]})
        elif self.unavailable:
            logger.warning("an audit witness takes checkpoints again after %d refused request(s); serving again",
                           self._refused)
            self._record("witness_resumed", {"reason": self.unavailable, "refused_requests": self._refused,
                                             "unavailable_seconds": int(time.time() - (self._unavailable_since or 0))})
            self.unavailable, self._unavailable_since, self._refused = None, None, 0

    @staticmethod
    def _record(kind: str, fields: dict) -> None:
        audit = services.audit_events
        if audit is None:
            return
        try:
            audit.append_event(kind, fields)
        except AuditUnavailable:
            pass  # the audit log refuses requests itself while it cannot write

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # At the headers, before every request hook: the audit log's intent entry (written by its request hook,
        # the last one) then never claims a request this refusal keeps from the upstream.
        if self.unavailable and flow.live and not is_answered(flow):
            self._refused += 1
            refuse(flow, 503, UNAVAILABLE_CODE,
                   "the gateway cannot hand its audit checkpoints to a witness, so it serves no request until it can")


addons = [AuditWitness()]
