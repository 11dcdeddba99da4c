"""Appends hash-chained entries to <records>/audit/ (per request an intent before it goes upstream, per recorded
flow its outcome before the reply ends and the digest of its record as the recorder takes it, per gateway
event one); fails closed.

Whatever goes wrong on the way to an entry (the disk, a descriptor, a key file, a bug in building the
entry) closes the gateway the same way: the reply not sent yet is refused with 503
gateway_audit_unavailable, new requests are refused, and the periodic tick (which survives any error
and logs it) writes an audit_resumed entry naming the outage once the log takes entries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections import deque
from pathlib import Path

from mitmproxy import ctx, exceptions, http
from mitmproxy import version as mitmproxy_version

from auditgate.audit.chain import (
    AUDIT_SUBDIR,
    PUBLIC_KEY_FILE,
    AuditWriter,
    BrokenLogError,
    WriterSettings,
    key_id,
    load_or_create_private_key,
    load_private_key_file,
    public_key_pem,
    public_key_record,
    sync_and_close,
    utc_timestamp,
    write_atomically,
)
from auditgate.audit.entries import (
    flow_fields,
    intent_fields,
    read_rules_state,
    record_fields,
    rules_signature,
)
from auditgate.audit.errors import describe
from auditgate.core.flow_contract import (
    INSTANCE,
    INTENT_SEQ,
    REFUSAL,
    AuditUnavailable,
    services,
)
from auditgate.core.options import (
    add_gateway_options,
    instance_id,
    records_dir,
    rules_dir,
)
from auditgate.core.private_files import (
    describe_tightened,
    private_dir,
    tighten,
    tighten_tree,
)
from auditgate.core.refusal import is_answered, refuse

logger = logging.getLogger("auditgate.addons.audit_log")

DEFAULT_KEY_NAME = "audit-signing-key.pem"
PENDING_KEY_SUFFIX = ".next"  # `auditgate audit rotate-key` leaves the new key here for the gateway to adopt
UNAVAILABLE_CODE = "gateway_audit_unavailable"
FSYNC_POLICIES = ("entry", "checkpoint", "never")
TICK_SECONDS = 1.0
RULES_CHECK_SECONDS = 2.0
MAX_UNAUDITED_IDS = 10_000


def _fsync_and_close(fd: int, sync: bool = True) -> None:
    error = sync_and_close(fd, sync)
    if error is not None:
        raise error


class AuditLog:
    """Writes the tamper-evident audit log: a chained entry per flow, signed checkpoints; refuses when it cannot."""

    def __init__(self) -> None:
        self.writer: AuditWriter | None = None
        self.key_path: Path | None = None
        self.unavailable: str | None = None
        self._unavailable_since: str | None = None
        self._refused_while_unavailable = 0
        self._unaudited: list[str] = []
        self._withheld: list[str] = []  # entries written, not durable: their replies were refused
        self._started = False
        self._flows_this_run = 0
        self._task: asyncio.Task | None = None
        self._rules_signature: tuple | None = None
        self._next_rules_check = 0.0
        self._sync_future: asyncio.Future | None = None
        self._synced_seq = 0
        self._key_files_stale = False  # a rotated key is in the log and in use, not yet in its file
        self._rejected_pending: tuple | None = None  # (mtime, size) of a pending key already refused
        self.instance = ""  # this gateway's gateway_instance: on every entry and every flow
        # (seq, flow id) of flow entries written while their record was still on its way to its flow file (the
        # flow recorder writes it a moment later, in another process): checkpoints name the first one still so.
        self._records_on_their_way: deque[tuple[int, str]] = deque()
        self._appending_unsettled = False  # the flow entry being appended now has its record on its way
        # A forwarded request's content and the SHA-256 its intent entry gave it: its flow entry takes the digest
        # from here while the request still has that very content (a large prompt is hashed once, not twice).
        self._intent_content: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Flows whose entry is written and whose record is not taken yet: [(the flow entry's seq, the intent's
        # request content and digest)], in the order written (a flow recorded twice, as a reply and then as an
        # error, has two of each). The flow recorder's record_taken() turns each into the flow's record entry.
        self._awaiting_record: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ---- options and lifecycle ----------------------------------------------------------------------
    def load(self, loader) -> None:
        add_gateway_options(loader)
        loader.add_option(
            "gateway_audit_key", str, "",
            f"Ed25519 private key that signs audit checkpoints; created (mode 0600) at first start. "
            f"Must lie outside the records directory. Default: <confdir>/{DEFAULT_KEY_NAME}.",
        )
        loader.add_option(
            "gateway_audit_fsync", str, "checkpoint",
            "When the audit log is fsynced: 'entry' (each flow waits for its entry to reach the disk; concurrent "
            "flows share one fsync), 'checkpoint' (at each signed checkpoint) or 'never' (left to the OS). "
            "Every entry is written to the OS before the client receives the response's end in all three.",
            choices=FSYNC_POLICIES,
        )
        loader.add_option(
            "gateway_audit_checkpoint_entries", int, 100, "Sign the audit chain's head after this many entries."
        )
        loader.add_option(
            "gateway_audit_checkpoint_seconds", int, 10,
            "Sign the audit chain's head when it has been unsigned this many seconds.",
        )
        loader.add_option("gateway_audit_max_mb", int, 64, "Start a new audit file once the current one reaches this size.")

    def configure(self, updated: set[str]) -> None:
        for name in ("gateway_audit_checkpoint_entries", "gateway_audit_checkpoint_seconds", "gateway_audit_max_mb"):
            if name in updated and getattr(ctx.options, name) < 1:
                raise exceptions.OptionsError(f"auditgate: {name} must be at least 1")
        settings = WriterSettings(
            checkpoint_entries=ctx.options.gateway_audit_checkpoint_entries,
            checkpoint_seconds=ctx.options.gateway_audit_checkpoint_seconds,
            max_bytes=ctx.options.gateway_audit_max_mb * 1024 * 1024,
            fsync=ctx.options.gateway_audit_fsync,
        )
        self.instance = instance_id()
        if self.writer is not None and not updated & {"gateway_records", "gateway_audit_key", "confdir"}:
            self.writer.settings = settings
            self.writer.instance = self.instance
            return
        key_path = self._key_path()
        audit_dir = records_dir().expanduser().absolute() / AUDIT_SUBDIR
        if key_path.absolute().is_relative_to(records_dir().expanduser().absolute()):
            raise exceptions.OptionsError(
                f"auditgate: gateway_audit_key={key_path} lies inside the records directory; the signing key must "
                "be kept apart from what it signs"
            )
        try:
            if key_path.exists() and tighten(key_path):
                logger.warning("the audit signing key %s was readable by other users: made it 0600. It may have been "
                               "copied meanwhile; consider `auditgate audit rotate-key --key %s`", key_path, key_path)
            self._make_key_directories_private(raise_errors=True)
            key, created = load_or_create_private_key(key_path)
            private_dir(audit_dir)  # 0700, the records directory too if it is made here
            tightened = [records_dir()] if tighten(records_dir()) else []
            tightened += tighten_tree(audit_dir, root_shared_ok=True)  # audit/ is the gateway's by its name
            if tightened:
                logger.warning("made audit files private (files 0600, directories 0700) that other users could "
                               "read: %s", describe_tightened(tightened, records_dir()))
            self._shutdown_writer()
            writer = AuditWriter(audit_dir, key, settings, instance=self.instance,
                                 pending_records_from=self._pending_records_from)
            write_atomically(audit_dir / PUBLIC_KEY_FILE, public_key_pem(key.public_key()))
        except BrokenLogError as e:
            raise exceptions.OptionsError(f"auditgate: the audit log cannot be continued: {e}") from None
        except (OSError, ValueError) as e:
            raise exceptions.OptionsError(f"auditgate: audit log {audit_dir} / key {key_path}: {e}") from None
        except Exception as e:  # whatever else: the gateway does not start without its audit log
            raise exceptions.OptionsError(f"auditgate: audit log {audit_dir} / key {key_path}: {describe(e)}") from None
        self.writer, self.key_path, self._started = writer, key_path, False
        logger.info(
            "audit log: %s (continuing after seq %d%s); signing key %s %s (id %s…), public key in %s",
            audit_dir, writer.seq, "" if writer.tail.clean else ", after an unclean stop",
            key_path, "created" if created else "loaded", writer.key_id[:16], audit_dir / PUBLIC_KEY_FILE,
        )
        services.audit_events = self  # approval decisions are written through append_event
        if "confdir" in updated:
            try:  # a confdir changed while running: mitmproxy makes its CA there after this hook
                asyncio.get_running_loop().call_soon(self._make_key_directories_private)
            except RuntimeError:
                pass  # not running yet: `running` does it

    def _key_path(self) -> Path:
        if ctx.options.gateway_audit_key:
            return Path(ctx.options.gateway_audit_key).expanduser()
        return Path(ctx.options.confdir).expanduser() / DEFAULT_KEY_NAME

    def _make_key_directories_private(self, raise_errors: bool = False) -> None:
        """mitmproxy's confdir holds the CA's private key and, by default, the audit signing key: it and all in
        it are made private (0700, 0600; the CA's public certificate too: callers get a copy). mitmproxy
        writes its CA there under the process's umask; at start before this addon loads, after an option
        change only once the change is applied, hence a second pass from `running` and the next loop turn."""
        confdir = Path(ctx.options.confdir).expanduser()
        try:
            tightened = tighten_tree(confdir) if confdir.exists() else []
        except OSError as e:
            if raise_errors:
                raise
            logger.error("could not make the key directory %s private: %s", confdir, describe(e))
            return
        if tightened:
            logger.warning("made the key directory private (files 0600, directories 0700), other users could read: %s",
                           describe_tightened(tightened, confdir))

    def running(self) -> None:
        self._make_key_directories_private()
        self._ensure_started()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick_forever())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._shutdown_writer()

    def _shutdown_writer(self) -> None:
        if self.writer is None:
            return
        if self._started and self.unavailable:
            self._try_resume()  # where the log takes entries again, the outage and the flows it left are said first
        try:
            if self._started and not self.unavailable:
                self.writer.append("gateway_stop", {"pid": os.getpid(), "flows": self._flows_this_run})
            self.writer.close()
            self._synced_seq = self.writer.seq  # closed with an fsync that succeeded
        except Exception as e:
            logger.error("the audit log could not be closed cleanly: %s", describe(e))
        self.writer, self._started = None, False
        if services.audit_events is self:
            services.audit_events = None

    def _ensure_started(self) -> None:
        """The run's first entries: gateway_start (with the signing key), the config digests, a checkpoint."""
        if self._started or self.writer is None or self.unavailable:
            return
        try:
            self._write_start_entries()
        except Exception as e:
            self._fail(e)

    def _write_start_entries(self) -> None:
        self.writer.append("gateway_start", {
            "pid": os.getpid(),
            "mitmproxy": mitmproxy_version.VERSION,
            "modes": list(ctx.options.mode),
            "signing_key": public_key_record(self.writer.signing_key.public_key()),
        })
        self._check_rules(force=True)
        self._adopt_pending_key()
        self.writer.checkpoint("start")
        self._started = True
        self._after_write()

    # ---- flows --------------------------------------------------------------------------------------
    def _mark(self, flow: http.HTTPFlow) -> None:
        """The instance that serves the flow, from its first hook on (so that every addon and record sees it)."""
        if INSTANCE.get(flow) is None:
            INSTANCE.set(flow, self.instance)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._mark(flow)

    def request(self, flow: http.HTTPFlow):
        self._mark(flow)
        if not flow.live or is_answered(flow):
            return None
        if self.unavailable:
            self._refused_while_unavailable += 1
            refuse(flow, 503, UNAVAILABLE_CODE,
                   "the gateway cannot write its audit log, so it serves no request until it can")
            return None
        return self._intent(flow)

    def _intent(self, flow: http.HTTPFlow):
        """The last request hook: the request goes upstream when this returns, so its intent entry is written
        first (and with fsync=entry, synced first); the outcome entry names it. Without it: refused."""
        if self.writer is None:
            return None
        self._ensure_started()
        if not self.unavailable:
            try:
                entry = self.writer.append("intent", intent_fields(flow), sanitized=True)
            except Exception as e:  # not forwarded without its intent entry
                self._fail(e)
            else:
                INTENT_SEQ.set(flow, entry["seq"])
                self._intent_content[flow] = (flow.request.raw_content, entry["request_sha256"])
                self._after_write()
                if self.writer.settings.fsync == "entry":
                    return self._durable_intent(flow, entry["seq"])
                return None
        self._refused_while_unavailable += 1
        refuse(flow, 503, UNAVAILABLE_CODE, "the gateway could not write its audit log for this request")
        return None

    async def _durable_intent(self, flow: http.HTTPFlow, seq: int) -> None:
        if not await self._synced(seq):
            logger.error("the intent entry of flow %s may not be on disk; the request is not forwarded", flow.id)
            self._refused_while_unavailable += 1
            refuse(flow, 503, UNAVAILABLE_CODE, "the gateway could not make its audit entry for this request durable")

    def http_connect(self, flow: http.HTTPFlow):
        self._mark(flow)
        # Mirrors the flow recorder: a refused CONNECT is recorded, and never reaches the response hook.
        if flow.live and flow.response and flow.response.status_code >= 400:
            return self._audit_flow(flow)

    def response(self, flow: http.HTTPFlow):
        self._mark(flow)
        if flow.websocket is not None and flow.response is not None and flow.response.status_code == 101:
            return None  # a WebSocket session: its entry is written at its end, with its messages (websocket_end)
        # mitmproxy sends the response (or a streamed response's end) only once this hook returns.
        if flow.live:
            return self._audit_flow(flow)

    def error(self, flow: http.HTTPFlow):
        self._mark(flow)
        if flow.live:
            return self._audit_flow(flow)

    def websocket_end(self, flow: http.HTTPFlow):
        # After the flow recorder's (bundle order), which named the flow file; the record entry, once the
        # recorder takes the record, digests every message.
        return self._audit_flow(flow)

    def _audit_flow(self, flow: http.HTTPFlow):
        if self.writer is None:
            return None
        self._ensure_started()
        if not self.unavailable:
            records = services.flow_records
            self._appending_unsettled = records is not None and records.unsettled(flow.id)
            request_content = self._intent_content.pop(flow, None)
            try:
                fields = flow_fields(flow, time.time(), request_content)
                entry = self.writer.append("flow", fields, sanitized=True)
            except Exception as e:  # any error at all: this reply is not sent without its entry
                self._appending_unsettled = False
                self._fail(e)
            else:
                if self._appending_unsettled:
                    self._appending_unsettled = False
                    self._records_on_their_way.append((entry["seq"], flow.id))
                self._awaiting_record.setdefault(flow, []).append((entry["seq"], request_content))
                self._flows_this_run += 1
                self._after_write()
                if self.writer.settings.fsync == "entry":
                    return self._durable(flow, entry["seq"])
                return None
        # No entry: a reply not sent yet is refused instead (the flow recorder, which takes the flow's
        # state a loop turn or two later, records the refusal); one already streamed is noted as unaudited.
        refused_here = (REFUSAL.get(flow) or {}).get("code") == UNAVAILABLE_CODE  # by the request hook: counted
        if self._can_withhold(flow) and not refused_here:
            self._refused_while_unavailable += 1
            refuse(flow, 503, UNAVAILABLE_CODE, "the gateway could not write its audit log for this request")
        self._note_unaudited(flow)
        return None

    def record_taken(self, flow: http.HTTPFlow) -> None:
        """The flow recorder took the flow's record (after its reply went out, before the record can reach its file):
        the record entry, the digest of everything that record holds, follows the flow's entry now. Off the reply's
        path, so never a refusal: where it cannot be written the log closes (new requests refused) and the flow is
        named among those served unaudited. Never raises: the recorder writes the record whatever happens here."""
        waiting = self._awaiting_record.get(flow)
        if not waiting or self.writer is None:
            return  # no flow entry to follow (the log could not take it, or another run wrote it)
        flow_seq, request_content = waiting.pop(0)
        if not waiting:
            del self._awaiting_record[flow]
        if not self.unavailable:
            try:
                self.writer.append("record", record_fields(flow, flow_seq, request_content), sanitized=True)
                self._after_write()
                return
            except Exception as e:
                self._fail(e)
        if len(self._unaudited) < MAX_UNAUDITED_IDS:  # served (its flow entry is in), whatever its refusal says
            self._unaudited.append(flow.id)

    def _pending_records_from(self) -> int | None:
        """The seq of the first flow entry whose record is still on its way to its file, or None (the writer asks
        at each checkpoint): a crash loses such records, and the verifier then says so, rather than "removed"."""
        waiting = self._records_on_their_way
        records = services.flow_records
        if records is None:  # the recorder is not loaded, or closed (having written or reported every record)
            waiting.clear()
            return None
        while waiting and not records.unsettled(waiting[0][1]):
            waiting.popleft()
        if waiting:
            return waiting[0][0]
        if self._appending_unsettled and self.writer is not None:
            return self.writer.seq  # the flow entry whose append brings this checkpoint
        return None

    @staticmethod
    def _can_withhold(flow: http.HTTPFlow) -> bool:
        response = flow.response
        return (response is not None and not response.stream and flow.request.method != "CONNECT"
                and flow.websocket is None)

    def _note_unaudited(self, flow: http.HTTPFlow) -> None:
        refusal = REFUSAL.get(flow) or {}
        if refusal.get("code") != UNAVAILABLE_CODE and len(self._unaudited) < MAX_UNAUDITED_IDS:
            self._unaudited.append(flow.id)

    # ---- other entries ------------------------------------------------------------------------------
    def append_event(self, kind: str, fields: dict) -> dict:
        if self.writer is None:
            raise AuditUnavailable("the audit log is not configured")
        self._ensure_started()
        if self.unavailable:
            raise AuditUnavailable(self.unavailable)
        try:
            entry = self.writer.append(kind, fields)
            self._after_write()
        except Exception as e:
            self._fail(e)
            raise AuditUnavailable(self.unavailable) from None
        return entry

    def _check_rules(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_rules_check:
            return
        self._next_rules_check = now + RULES_CHECK_SECONDS
        directory = rules_dir()
        signature = rules_signature(directory)
        if not force and signature == self._rules_signature:
            return
        # File digests, and per rule of policy.yaml (which rules an edit added, removed or changed).
        fields = read_rules_state(directory).config_fields("start" if force else "changed", directory)
        self.writer.append("config", fields, sanitized=True)
        self._rules_signature = signature  # only once written: a failed write is tried again

    def _adopt_pending_key(self) -> None:
        """`auditgate audit rotate-key` left a new key: a key_rotation entry, then the key files.

        A failure half-way closes the gateway (through the caller); the next try completes what is left,
        never rotates twice to the same key."""
        pending = self.key_path.with_name(self.key_path.name + PENDING_KEY_SUFFIX)
        try:
            stat = pending.stat()
        except FileNotFoundError:
            return
        if (stat.st_mtime_ns, stat.st_size) == self._rejected_pending:
            return
        try:
            new_key = load_private_key_file(pending)
        except (OSError, ValueError) as e:
            logger.error("ignoring the pending audit key %s: %s", pending, describe(e))
            self._rejected_pending = (stat.st_mtime_ns, stat.st_size)
            try:
                pending.rename(pending.with_name(pending.name + ".rejected"))
            except OSError as e:
                logger.error("could not set the refused pending audit key %s aside: %s", pending, describe(e))
            return
        old_id = self.writer.key_id
        if key_id(new_key.public_key()) != old_id:  # else: rotated already, only the files are left to do
            self.writer.rotate_key(new_key)
            self._key_files_stale = True
            logger.info("audit signing key rotated: %s… → %s…", old_id[:16], self.writer.key_id[:16])
        os.replace(pending, self.key_path)  # the old private key is gone; its public key stays in the log
        write_atomically(self.writer.directory / PUBLIC_KEY_FILE, public_key_pem(new_key.public_key()))
        self._key_files_stale = False

    # ---- the periodic tick: interval checkpoints, config changes, key rotation, recovery ----------------
    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.tick()
            except Exception as e:  # tick() handles its own errors; this task must outlive even a bug there
                logger.error("the audit log's periodic tick failed: %s", describe(e), exc_info=True)

    def tick(self) -> None:
        """Interval checkpoints, rules changes, key rotation, resuming after an outage; never raises."""
        if self.writer is None:
            return
        try:
            if self.unavailable:
                self._try_resume()
                return
            self._ensure_started()
            if self.unavailable:
                return
            self._adopt_pending_key()
            self._check_rules()
            if self.writer.checkpoint_due():
                self.writer.checkpoint("interval")
            self._after_write()
        except Exception as e:
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        reason = describe(error)
        if not self.unavailable:
            logger.error("audit log unavailable, refusing new requests with 503 %s: %s", UNAVAILABLE_CODE, reason)
            if not isinstance(error, OSError):  # a bug, not the disk: where it happened helps (no message: see describe)
                logger.debug("the audit log's error", exc_info=error)
            self._unavailable_since = utc_timestamp()
        self.unavailable = reason

    def _try_resume(self) -> None:
        fields = {"unavailable_since": self._unavailable_since, "reason": self.unavailable,
                  "refused_requests": self._refused_while_unavailable, "unaudited_flows": list(self._unaudited)}
        if self._withheld:
            fields["withheld_flows"] = list(self._withheld)
        try:
            if not self._started:  # the log failed before this run's first entries: they come first
                self._write_start_entries()
            if self._key_files_stale:  # a rotation whose key files could not be written: those first
                self._adopt_pending_key()
            self.writer.append("audit_resumed", fields)
            self.writer.checkpoint("resumed")
            self._after_write()
        except Exception as e:
            self.unavailable = describe(e)
            return
        logger.warning("audit log writable again after refusing %d request(s); serving again",
                       self._refused_while_unavailable)
        self.unavailable, self._unavailable_since = None, None
        self._refused_while_unavailable, self._unaudited, self._withheld = 0, [], []

    # ---- durability -----------------------------------------------------------------------------------
    def _after_write(self) -> None:
        """Files rotated away from, and the log after a checkpoint, are fsynced in a thread; an error closes.

        Raises (AuditWriteError) only when no descriptor to sync could be had; its callers fail closed."""
        sync = self.writer.settings.fsync != "never"
        fds = [(fd, sync) for fd in self.writer.take_retired()]
        if self.writer.sync_wanted:
            fd = self.writer.dup_for_sync()
            if fd is not None:
                fds.append((fd, True))
        if not fds:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for fd, sync_it in fds:
            if loop is None:
                try:
                    _fsync_and_close(fd, sync_it)
                except OSError as e:
                    self._fail(e)
            else:
                loop.run_in_executor(None, _fsync_and_close, fd, sync_it).add_done_callback(self._sync_done)

    def _sync_done(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._fail(future.exception())

    async def _synced(self, seq: int) -> bool:
        """Group commit: wait until an fsync that started after entry `seq` was written has succeeded."""
        while self._synced_seq < seq and self.writer is not None and not self.unavailable:
            if self._sync_future is None:
                self._sync_future = asyncio.ensure_future(self._sync_now())
            await asyncio.shield(self._sync_future)
        return self._synced_seq >= seq

    async def _durable(self, flow: http.HTTPFlow, seq: int) -> None:
        """With fsync=entry no reply goes out before its entry is on disk: if no fsync could make it durable
        (a failed fsync closes the log), the reply is refused instead."""
        if await self._synced(seq):
            return
        if self._can_withhold(flow):
            logger.error("the audit entry of flow %s may not be on disk; its reply is withheld", flow.id)
            self._refused_while_unavailable += 1
            if len(self._withheld) < MAX_UNAUDITED_IDS:
                self._withheld.append(flow.id)
            refuse(flow, 503, UNAVAILABLE_CODE, "the gateway could not make its audit entry for this request durable")

    async def _sync_now(self) -> None:
        try:
            if self.writer is None:  # shut down meanwhile: closing synced it, or said why not
                return
            target = self.writer.seq
            fd = self.writer.dup_for_sync()
            if fd is not None:
                await asyncio.to_thread(_fsync_and_close, fd)
            self._synced_seq = max(self._synced_seq, target)
        except Exception as e:
            self._fail(e)
        finally:
            self._sync_future = None


addons = [AuditLog()]
