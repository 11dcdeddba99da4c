"""Writes flow records to mitmproxy flow files in a child process, so the disk never holds up the proxy.

The proxy encodes each flow itself, with our byte-identical tnetstring encoder
(auditgate.recording.tnetstring, ~3x mitmproxy's), and hands the child raw encoded bytes: no pickling
on either side, and the child only appends what it gets. Encoding in the child instead cost more CPU
in all (pickle, unpickle and a slower encoder), and both processes share the gateway's core. A flow
that cannot be encoded loses only itself, reported before it is handed over. The child runs in its
own session (see child_process) and exits when the pipe closes, after writing everything it was
given: a gateway that is interrupted, or killed, loses no flow it had already handed over.

The proxy's end never blocks its event loop on the pipe: its end is non-blocking, what the pipe
cannot take yet waits in a queue the caller can see the size of (and refuses new work on, when it
grows), and the rest is written when the loop says the pipe has room. The child answers each job
on a second pipe (written, or the error that stopped it), so the proxy knows, flow by flow, what
reached a file and what was lost: on a disk error, or when the child dies with jobs it had not
answered yet.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import select
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from auditgate.audit.errors import describe
from auditgate.core.child_process import child_ends, start_child, stop_child
from auditgate.core.private_files import open_private
from auditgate.recording import tnetstring
from auditgate.recording.state import connection_state, http_flow_state

logger = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("!QQB")  # a job: the length of what follows, its number, its kind
FLOWS, PROBE = 0, 1  # kinds: a file's path (UTF-8), NUL, its encoded flows; a directory to probe (UTF-8)
PROBE_BYTES = 64 * 1024  # what a probe writes (and removes again) to learn whether the disk takes data
PROBE_PREFIX = ".probe-"  # hidden: nobody reads it as a flow file
MIN_RESTART_SECONDS = 0.5  # a child that keeps dying is restarted at most this often
_WRITE_CHUNK = 256 * 1024


def flow_record(flow) -> bytes:
    """The flow's record as mitmproxy's FlowWriter writes it: ``tnetstring.dumps(flow.get_state())``, byte for byte.

    Both halves are our faster equals (auditgate.recording.state and .tnetstring). ``get_state`` deep-copies
    the metadata so the state outlives later changes; encoded at once, the flow's own metadata gives the
    same bytes without the copy.
    """
    # nothing else runs meanwhile: the metadata cannot change
    return tnetstring.dumps(http_flow_state(flow, _encoded_connection))


# A kept-alive connection's state is the same flow after flow (its timestamps are set once, its end
# only at its close): its encoding, ~40 % of a flow's record for the two connections, is made once.
# Bounded: 512 states of ~0.5 KB, pickle and encoding, whatever connections come and go.
_connections = tnetstring.Remembered(512)


def _encoded_connection(conn) -> tnetstring.Encoded:
    return _connections(connection_state(conn))


# ---- the child --------------------------------------------------------------------------------------


def _answer(fd: int, answer: dict) -> None:
    data = json.dumps(answer, separators=(",", ":")).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def _probe(directory: str) -> None:
    """Write PROBE_BYTES to a hidden file beside the flow files and remove it: raises if the disk refuses."""
    path = os.path.join(directory, f"{PROBE_PREFIX}{os.getpid()}")
    try:
        with open_private(path, "wb") as file:
            file.write(b"\0" * PROBE_BYTES)
            file.flush()
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def write_batches(jobs_fd: int, answers_fd: int) -> None:
    """The child's loop: jobs in, each answered with the error that stopped it, if any."""
    files: dict[str, Any] = {}
    jobs = os.fdopen(jobs_fd, "rb", buffering=1024 * 1024, closefd=False)
    try:
        while True:
            header = jobs.read(FRAME_HEADER.size)
            if len(header) < FRAME_HEADER.size:
                break  # the gateway closed the pipe, or is gone: all it sent has been written
            length, number, kind = FRAME_HEADER.unpack(header)
            payload = jobs.read(length)
            if len(payload) < length:
                break  # the gateway died in the middle of a job: it cannot have counted on it
            error: str | None = None
            if kind == PROBE:
                try:
                    _probe(payload.decode())
                except OSError as e:
                    error = describe(e)
                _answer(answers_fd, {"batch": number, "error": error})
                continue
            split = payload.index(b"\0")
            path, records = payload[:split].decode(), memoryview(payload)[split + 1:]
            file, size = files.get(path), None
            try:
                if file is None:
                    for old in files.values():  # the gateway has moved on to a new file
                        old.close()
                    files.clear()
                    # 0600 whatever the umask: flow files hold prompts and replies.
                    file = files[path] = open_private(path, "ab")
                size = file.tell()
                # One buffered write and a flush per job: all of it, or an error (every flow in it lost).
                file.write(records)
                file.flush()
            except OSError as e:
                error = describe(e)
                # Cut a half-written job off, so what follows can still be read back.
                if file is not None:
                    try:
                        if size is not None:
                            os.ftruncate(file.fileno(), size)
                    except OSError:
                        pass
                    files.pop(path, None)
                    try:
                        file.close()
                    except OSError:
                        pass
            _answer(answers_fd, {"batch": number, "error": error})
    finally:
        for file in files.values():
            try:
                file.close()
            except OSError:
                pass


# ---- the gateway's end ------------------------------------------------------------------------------


@dataclass
class LostRecord:
    """A flow whose record did not reach its file."""

    flow_id: str
    flow_file: str
    reason: str


@dataclass
class Outcome:
    """What the writer learnt: a batch answered, a probe answered, or the child gone."""

    lost: list[LostRecord] = field(default_factory=list)
    error: str | None = None  # the disk refused (or the child is gone): recording is failing
    probe: bool = False
    ended: bool = False  # the child ended; its unanswered batches are in `lost`
    answered: bool = False  # a child answered: it is alive and reading
    written: list[str] = field(default_factory=list)  # ids of the flows the answered batch put in their files


@dataclass
class _Job:
    number: int
    data: memoryview  # header and payload
    flows: list[tuple[str, str]]  # (flow id, flow file name)
    probe: bool = False
    sent: int = 0
    queued_at: float = field(default_factory=time.monotonic)


class FlowFileWriter:
    """The gateway's end: starts the child and hands it jobs without ever waiting for the pipe.

    `on_outcome` is called (on the event loop) with each Outcome. `queued_bytes` is what waits for the
    pipe; the caller refuses new work while it is too big.
    """

    def __init__(self, on_outcome: Callable[[Outcome], None] | None = None) -> None:
        self.on_outcome = on_outcome or _log_outcome
        self._process: subprocess.Popen | None = None
        self._jobs = None
        self._answers = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching_writes = False
        self._queue: deque[_Job] = deque()
        self.queued_bytes = 0
        self._unanswered: dict[int, _Job] = {}  # in the pipe or with the child
        self._answer_buffer = bytearray()
        self._next_job = 0
        self._last_start = float("-inf")
        self.closed = False

    # -- life
    @property
    def running(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def unanswered(self) -> int:
        return len(self._unanswered) + len(self._queue)

    def oldest_unanswered_age(self) -> float:
        """Seconds since the oldest job the child has not answered yet was queued (0 when none waits)."""
        waiting = [job.queued_at for job in self._unanswered.values()]
        if self._queue:
            waiting.append(self._queue[0].queued_at)
        return time.monotonic() - min(waiting) if waiting else 0.0

    def start(self) -> bool:
        """Start the child if there is none (at most every MIN_RESTART_SECONDS); True if one is running."""
        if self._process is not None:
            self._watch()
            return True
        if self.closed or time.monotonic() - self._last_start < MIN_RESTART_SECONDS:
            return False
        self._last_start = time.monotonic()
        try:
            self._process, self._jobs, self._answers = start_child(__name__)
        except OSError as e:
            logger.error("could not start the flow file writer process: %s", describe(e))
            return False
        os.set_blocking(self._jobs.fileno(), False)
        os.set_blocking(self._answers.fileno(), False)
        for job in self._queue:  # never sent to this child: from the start
            job.sent = 0
        self._watch()
        self._pump()
        return True

    def _watch(self) -> None:
        """Have the running event loop tell us about answers (and the child's end) as they come."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._loop is loop or self._answers is None:
            return
        self._loop = loop
        loop.add_reader(self._answers.fileno(), self.read_answers)

    # -- handing over
    def submit(self, flows: list[tuple[str, str, bytes]]) -> int:
        """Queue (path, flow id, record) triples for the child, a record being a flow's encoded bytes
        (flow_record); returns the bytes they add to the files. Each file's records go over as one job.
        Never blocks and never raises for the pipe: what cannot be handed over is reported as lost through
        `on_outcome`.
        """
        by_path: dict[str, tuple[list[bytes], list[tuple[str, str]]]] = {}
        for path, flow_id, record in flows:
            records, names = by_path.setdefault(path, ([], []))
            records.append(record)
            names.append((flow_id, os.path.basename(path)))
        size = 0
        for path, (records, names) in by_path.items():
            data = b"".join([path.encode(), b"\0", *records])
            size += len(data) - len(path.encode()) - 1
            self._enqueue(data, names)
        return size

    def probe(self, directory: str) -> int:
        """Ask the child to write (and remove) a test file in directory; the answer is an Outcome(probe=True)."""
        return self._enqueue(None, [], probe=directory)

    def _enqueue(self, flows_data: bytes | None, names: list[tuple[str, str]], probe: str | None = None) -> int:
        self._next_job += 1
        number = self._next_job
        payload, kind = (probe.encode(), PROBE) if probe is not None else (flows_data, FLOWS)
        job = _Job(number, memoryview(FRAME_HEADER.pack(len(payload), number, kind) + payload), names,
                   probe=probe is not None)
        self._queue.append(job)
        self.queued_bytes += len(job.data)
        if self.start():
            self._pump()
        return number

    def _pump(self) -> None:
        """Write what the pipe takes now; ask the loop to call again when it has room."""
        while self._queue and self._jobs is not None:
            job = self._queue[0]
            try:
                written = os.write(self._jobs.fileno(), job.data[job.sent:job.sent + _WRITE_CHUNK])
            except BlockingIOError:
                self._watch_writes(True)
                return
            except OSError as e:  # EPIPE: the child is gone
                self._ended(describe(e))
                return
            job.sent += written
            self.queued_bytes -= written
            if job.sent == len(job.data):
                self._queue.popleft()
                self._unanswered[job.number] = job
        self._watch_writes(False)

    def _watch_writes(self, on: bool) -> None:
        if on == self._watching_writes or self._jobs is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a test, or shutdown): flush() writes the rest
        if on:
            loop.add_writer(self._jobs.fileno(), self._pump)
        else:
            loop.remove_writer(self._jobs.fileno())
        self._watching_writes = on

    # -- answers
    def read_answers(self) -> None:
        """Take in whatever answers the child has written (never waits); notices the child's end."""
        if self._answers is None:
            return
        ended = False
        while True:
            try:
                chunk = os.read(self._answers.fileno(), 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                ended = True
                break
            self._answer_buffer += chunk
        *lines, rest = self._answer_buffer.split(b"\n")
        self._answer_buffer = bytearray(rest)
        for line in lines:
            self._take_answer(line)
        if ended:
            self._ended("the flow file writer process ended")

    def _take_answer(self, line: bytes) -> None:
        try:
            answer = json.loads(line)
            job = self._unanswered.pop(answer["batch"], None)
        except (ValueError, KeyError, TypeError):
            logger.error("the flow file writer sent an answer that could not be read")
            return
        error = answer.get("error")
        # A job is written whole or not at all: on an error every flow in it is lost.
        lost = [LostRecord(flow_id, name, str(error)) for flow_id, name in job.flows] if error and job else []
        written = [flow_id for flow_id, _ in job.flows] if job and not error else []
        self._report(Outcome(lost=lost, error=error, probe=bool(job and job.probe), answered=True, written=written))

    def _ended(self, reason: str) -> None:
        """The child is gone: what it had not answered is lost; what it never got waits for the next one."""
        process = self._process
        if process is None:
            return
        if self.closed and not self._unanswered and not self._queue:  # the end of a clean shutdown
            code = stop_child(process, 5)
            if code:
                logger.error("the flow file writer failed at shutdown (exit code %s)", code)
            self._disconnect()
            return
        code = process.poll()
        if code is None:  # it closed a pipe but lives on: it cannot be trusted with more
            process.kill()
            try:
                code = process.wait(1)
            except subprocess.TimeoutExpired:
                code = None
        if code is not None and code < 0:
            reason = f"{reason} (killed by signal {-code})"
        elif code:
            reason = f"{reason} (exit code {code})"
        self._disconnect()
        if self._queue:
            self.queued_bytes += self._queue[0].sent  # a job cut in the pipe is sent again whole
            self._queue[0].sent = 0
        unanswered, self._unanswered = self._unanswered, {}
        why = f"{reason} before writing them"
        lost = [LostRecord(flow_id, name, why) for job in unanswered.values() for flow_id, name in job.flows]
        logger.error("%s; %d flow record(s) it held are lost", reason, len(lost))
        self._report(Outcome(lost=lost, error=reason, ended=True))

    def _disconnect(self) -> None:
        if self._loop is not None and self._answers is not None:
            try:
                self._loop.remove_reader(self._answers.fileno())
                if self._watching_writes:
                    self._loop.remove_writer(self._jobs.fileno())
            except (RuntimeError, ValueError):  # the loop is closed
                pass
        self._loop, self._watching_writes = None, False
        for connection in (self._jobs, self._answers):
            if connection is not None:
                connection.close()
        self._process, self._jobs, self._answers = None, None, None

    def _report(self, outcome: Outcome) -> None:
        try:
            self.on_outcome(outcome)
        except Exception:
            logger.exception("handling the flow file writer's answer failed")

    # -- waiting (tests and shutdown only: this blocks)
    def flush(self, timeout: float = 30.0, answers: bool = True) -> bool:
        """Block until every queued job is in the pipe (and, with answers, answered); True if it got there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None and self._queue and not self.start():
                time.sleep(0.05)
                continue
            if not self._queue and (not answers or not self._unanswered):
                return True
            if self._process is None:
                return not self._queue
            readers = [self._answers.fileno()]
            writers = [self._jobs.fileno()] if self._queue else []
            ready_r, ready_w, _ = select.select(readers, writers, [], min(0.1, max(0.0, deadline - time.monotonic())))
            if ready_r:
                self.read_answers()
            if ready_w and self._jobs is not None:
                self._pump()
        return False

    def close(self, wait: float = 30.0) -> None:
        """Hand over everything queued, let the child write it and answer, then end it (within `wait` seconds
        in all). What it could not take is reported lost."""
        deadline = time.monotonic() + wait
        self.flush(wait)
        self.closed = True
        if self._process is not None:
            self._jobs.close()  # the child writes what it has, then sees the end of its input
            self._jobs = None
            while self._answers is not None and time.monotonic() < deadline:
                ready, _, _ = select.select([self._answers.fileno()], [], [], 0.1)
                if ready:
                    self.read_answers()  # at the child's end this reports what it never answered
            if self._process is not None:  # it did not finish in time
                logger.error("the flow file writer did not finish within %gs; it was ended", wait)
                self._ended("the flow file writer was ended at shutdown")
        never_sent = [LostRecord(flow_id, name, "the flow file writer could not take them before shutdown")
                      for job in self._queue for flow_id, name in job.flows]
        self._queue.clear()
        self.queued_bytes = 0
        if never_sent:
            self._report(Outcome(lost=never_sent, error="the flow file writer could not take them before shutdown"))


def _log_outcome(outcome: Outcome) -> None:
    for lost in outcome.lost:
        logger.error("could not record flow %s to %s: %s", lost.flow_id, lost.flow_file, lost.reason)


def main(argv: list[str]) -> None:
    jobs, answers = child_ends(argv)
    try:
        write_batches(jobs.fileno(), answers.fileno())
    except BrokenPipeError:  # the gateway is gone: nobody to answer
        pass
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise


if __name__ == "__main__":
    main(sys.argv)
