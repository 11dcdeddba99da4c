"""Worker processes that mask whole bodies, each on its own pipes, served by the event loop (no mitmproxy).

Why not concurrent.futures.ProcessPoolExecutor: it moves every job through a feeder thread and a
manager thread in the proxy process, and each hop wakes a thread and takes the GIL. Under load those
hand-offs cost the proxy's only event-loop thread more than the masking itself. Here a job is one
framed write to a worker's pipe and its answer one framed read, both non-blocking on the event loop
(add_writer / add_reader): no threads, and the loop never waits on a pipe. A body larger than the
pipe's buffer is written as the worker drains it; an answer is read as it arrives.

Back-pressure: one job per worker at a time, and at most ``queue_max`` jobs waiting for a worker.
A job beyond that is refused at once (MaskingBusy) instead of queueing without bound.

A job that outlives the timeout has its worker killed and replaced, so a pathological body cannot
keep a worker busy for the next ones; a worker that dies fails its job and is replaced at once.
Workers run in their own session (see child_process).
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import os
import pickle
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from auditgate.core.child_process import child_ends, start_child, stop_child
from auditgate.masking.config import DEFAULT_QUEUE_MAX_JOBS, MaskingSettings

logger = logging.getLogger(__name__)

WARM_UP_TEXT = "warm up: jane@example.com 4111 1111 1111 1111 DE89 3704 0044 0532 0130 00 +1 415-555-0100"

# Every message on a worker's pipes: its length (8 bytes, big-endian), then a pickle.
_HEADER = struct.Struct("!Q")
_READ_SIZE = 256 * 1024


class MaskingWorkerError(RuntimeError):
    """A job could not be masked: an error in the worker, a timeout, or a worker that died."""


class MaskingBusy(MaskingWorkerError):
    """Every worker is busy and the line of waiting jobs is full: the job is refused at once."""


def _own_fd(connection: Connection) -> int:
    """The connection's pipe end as a plain descriptor of our own (the connection is closed)."""
    fd = os.dup(connection.fileno())
    connection.close()
    return fd


# ---- in the worker process -------------------------------------------------------------------------
def _read_message(source: io.BufferedReader):
    header = source.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    payload = source.read(size)
    if len(payload) < size:
        raise EOFError
    return pickle.loads(payload)


def _write_message(sink: io.BufferedWriter, message) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sink.write(_HEADER.pack(len(payload)))
    sink.write(payload)
    sink.flush()


def serve_jobs(jobs: io.BufferedReader, answers: io.BufferedWriter) -> None:
    """A worker's life: settings in, build the masker, say ready, then answer (direction, kind, content
    type, body) jobs until the gateway closes the pipe."""
    from auditgate.masking.body import BodyNotMaskable, mask_body
    from auditgate.masking.engine import PiiMasker
    from auditgate.masking.errors import describe

    try:
        masker = PiiMasker(_read_message(jobs))
        masker.mask(WARM_UP_TEXT, "response")
        started = ("ready", os.getpid())
    except EOFError:
        return
    except Exception as e:
        started = ("error", f"{type(e).__name__}: {e}")
    try:
        _write_message(answers, started)
    except OSError:  # the gateway closed the pool while this worker was starting
        return
    if started[0] != "ready":
        return
    while True:
        try:
            direction, kind, content_type, body = _read_message(jobs)
        except EOFError:
            return
        try:
            answer = ("ok", mask_body(masker, body, content_type, kind, direction))
        except BodyNotMaskable as e:
            answer = ("error", str(e))
        except Exception as e:  # the gateway fails the flow closed; the message may quote the body: not sent
            answer = ("error", describe(e))
        try:
            _write_message(answers, answer)
        except OSError:  # the gateway is gone
            return


def _worker_main(argv: list[str]) -> None:
    jobs, answers = child_ends(argv)
    with open(_own_fd(jobs), "rb", buffering=_READ_SIZE) as source, open(_own_fd(answers), "wb") as sink:
        serve_jobs(source, sink)


# ---- in the proxy process ----------------------------------------------------------------------------
@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen
    jobs_fd: int  # non-blocking: written as far as the pipe takes, the rest when it drains
    answers_fd: int  # non-blocking: read when the loop says it is readable
    answer: asyncio.Future | None = None  # the answer to the job in hand, or to the start-up
    ready: bool = False
    late: asyncio.TimerHandle | None = None  # set while an abandoned job's answer is still to come
    outbox: collections.deque = field(default_factory=collections.deque)  # memoryviews still to write
    writing: bool = False  # a writer callback is registered
    inbox: bytearray = field(default_factory=bytearray)  # answer bytes not yet a whole message


@dataclass(eq=False)
class MaskingWorkers:
    """A fixed number of masking worker processes; jobs wait in a bounded line when all are busy."""

    settings: MaskingSettings
    count: int
    start_timeout: float = 120.0
    queue_max: int = DEFAULT_QUEUE_MAX_JOBS
    _workers: list[_Worker] = field(default_factory=list)
    _idle: collections.deque = field(default_factory=collections.deque)
    _waiting: collections.deque = field(default_factory=collections.deque)  # futures wanting a worker
    _closed: bool = False
    _starting: asyncio.Future | None = None

    async def start(self) -> None:
        """Spawn every worker and wait until each has built its masker (Presidio takes a second or two)."""
        if self._closed:
            raise MaskingWorkerError("the gateway is stopping")
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start_all())
        await asyncio.shield(self._starting)

    async def mask(self, direction: str, kind: str, content_type: str, body: bytes, timeout: float):
        """(masked body or None, findings), from a worker within timeout seconds; else MaskingWorkerError
        (MaskingBusy, at once, when the line of waiting jobs is full)."""
        try:
            if self._starting is None or not self._starting.done():
                # Started when the gateway starts (running hook); a job that comes first, or to a pool
                # made later on a new configuration, waits for it. Workers that failed to start were
                # reported then; the others serve.
                try:
                    await asyncio.wait_for(self.start(), timeout)
                except MaskingWorkerError:
                    pass
            return await asyncio.wait_for(self._run(direction, kind, content_type, body, timeout), timeout)
        except TimeoutError:
            raise MaskingWorkerError(f"timed out after {timeout:g}s") from None

    @property
    def waiting(self) -> int:
        """Jobs waiting for a worker."""
        return len(self._waiting)

    def close(self, wait: float = 2.0) -> None:
        """Close every worker's pipes (they end on their own), then wait up to `wait` seconds for them
        together, killing stragglers; with wait=0 nothing is waited for (they are reaped later)."""
        self._closed = True
        workers = list(self._workers)
        for worker in workers:
            self._retire(worker, reason="the gateway is stopping", kill=False)
        self._fail_waiting("the gateway is stopping")
        if wait <= 0:
            for worker in workers:
                _reap_later(worker.process, kill_after=5.0)
            return
        deadline = time.monotonic() + wait
        for worker in workers:
            stop_child(worker.process, max(0.0, deadline - time.monotonic()))

    # ---- internals -----------------------------------------------------------------------------------
    async def _start_all(self) -> None:
        loop = asyncio.get_running_loop()
        workers, errors = [], []
        for _ in range(self.count):
            try:
                workers.append(self._spawn(loop))
            except OSError as e:  # out of processes or file descriptors
                errors.append(MaskingWorkerError(f"a masking worker could not be started: {e}"))
                break
        results = await asyncio.gather(*(self._await_ready(w) for w in workers), return_exceptions=True)
        errors += [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _run(self, direction: str, kind: str, content_type: str, body: bytes, timeout: float):
        loop = asyncio.get_running_loop()
        worker = await self._acquire(loop)
        worker.answer = loop.create_future()
        try:
            self._send(worker, pickle.dumps((direction, kind, content_type, body), protocol=pickle.HIGHEST_PROTOCOL))
            status, value = await worker.answer
        except asyncio.CancelledError:
            # Given up on (timed out, most often after waiting in line) while the worker has it: its
            # answer, when it comes, is dropped and the worker goes back to work. One that is still
            # busy a whole timeout later is stuck and is replaced.
            worker.answer = None
            if worker in self._workers:
                worker.late = loop.call_later(timeout, self._replace, worker, "a job ran far past the timeout")
            raise
        worker.answer = None
        self._release(worker)
        if status != "ok":
            raise MaskingWorkerError(value)
        return value

    async def _acquire(self, loop) -> _Worker:
        if self._closed:
            raise MaskingWorkerError("the gateway is stopping")
        if not self._workers:
            raise MaskingWorkerError("no masking worker is running (see the log for why)")
        while self._idle:
            worker = self._idle.popleft()
            if worker in self._workers:
                return worker
        if len(self._waiting) >= self.queue_max:
            raise MaskingBusy(f"all {len(self._workers)} masking worker(s) are busy and {len(self._waiting)} "
                              f"job(s) are waiting")
        waiter = loop.create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed a worker just as the wait was given up
            else:
                try:
                    self._waiting.remove(waiter)
                except ValueError:
                    pass
            raise

    def _release(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def _fail_waiting(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(MaskingWorkerError(reason))

    def _spawn(self, loop) -> _Worker:
        process, jobs, answers = start_child(__name__)
        try:
            jobs_fd = _own_fd(jobs)
            answers_fd = _own_fd(answers)
        except OSError:
            process.kill()
            raise
        os.set_blocking(jobs_fd, False)
        os.set_blocking(answers_fd, False)
        worker = _Worker(process, jobs_fd, answers_fd, answer=loop.create_future())
        self._workers.append(worker)
        loop.add_reader(answers_fd, self._on_readable, worker)
        self._send(worker, pickle.dumps(self.settings))
        return worker

    def _send(self, worker: _Worker, payload: bytes) -> None:
        """Queue one message for the worker and write as much of it as its pipe takes now."""
        worker.outbox.append(memoryview(_HEADER.pack(len(payload))))
        worker.outbox.append(memoryview(payload))
        if not worker.writing:
            self._on_writable(worker)

    def _on_writable(self, worker: _Worker) -> None:
        outbox = worker.outbox
        try:
            while outbox:
                written = os.write(worker.jobs_fd, outbox[0])
                if written < len(outbox[0]):
                    outbox[0] = outbox[0][written:]
                    break
                outbox.popleft()
        except BlockingIOError:
            pass
        except OSError as e:  # the worker is gone (its end closed): it fails its job and is replaced
            outbox.clear()
            self._lost(worker, f"its pipe failed: {e}")
            return
        loop = asyncio.get_running_loop()
        if outbox and not worker.writing:
            loop.add_writer(worker.jobs_fd, self._on_writable, worker)
            worker.writing = True
        elif not outbox and worker.writing:
            loop.remove_writer(worker.jobs_fd)
            worker.writing = False

    def _on_readable(self, worker: _Worker) -> None:
        try:
            chunk = os.read(worker.answers_fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # the worker is gone (killed, crashed)
            self._lost(worker, "it ended unexpectedly" if worker.ready else "it ended during start-up")
            return
        inbox = worker.inbox
        inbox += chunk
        while len(inbox) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(inbox)
            end = _HEADER.size + size
            if len(inbox) < end:
                return
            try:
                message = pickle.loads(inbox[_HEADER.size:end])
            except Exception as e:  # a garbled answer: the worker is not to be trusted with more jobs
                self._lost(worker, f"its answer could not be read: {type(e).__name__}")
                return
            del inbox[:end]
            self._on_message(worker, message)

    def _on_message(self, worker: _Worker, message) -> None:
        if worker.late is not None:  # the answer to a job given up on: dropped
            worker.late.cancel()
            worker.late = None
            self._release(worker)
            return
        if worker.answer is not None and not worker.answer.done():
            worker.answer.set_result(message)

    def _lost(self, worker: _Worker, reason: str) -> None:
        if worker.ready:
            self._replace(worker, reason)
        else:  # one that never started is not replaced: it would fail again, forever
            self._retire(worker, reason=reason)

    async def _await_ready(self, worker: _Worker) -> None:
        try:
            status, value = await asyncio.wait_for(worker.answer, self.start_timeout)
        except TimeoutError:
            self._retire(worker, reason="it did not start in time")
            raise MaskingWorkerError(f"a masking worker did not start within {self.start_timeout:g}s") from None
        if status != "ready":
            self._retire(worker, reason="it could not start")
            raise MaskingWorkerError(f"a masking worker could not start: {value}")
        worker.answer, worker.ready = None, True
        self._release(worker)

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Retire a worker that was serving and start another in its place (jobs wait for it)."""
        if worker not in self._workers or self._closed:
            self._retire(worker, reason)
            return
        loop = asyncio.get_running_loop()
        try:
            fresh = self._spawn(loop)  # in the pool before the old one leaves: jobs wait, not fail
        except OSError as e:
            logger.error("masking worker could not be replaced: %s", e)
            fresh = None
        self._retire(worker, reason)
        if fresh is None:
            return

        async def ready() -> None:
            try:
                await self._await_ready(fresh)
            except MaskingWorkerError as e:
                logger.error("%s", e)

        loop.create_task(ready())

    def _retire(self, worker: _Worker, reason: str, kill: bool = True) -> bool:
        """Take a worker out of service; False if it already was. Never waits for the process."""
        if worker not in self._workers:
            return False
        self._workers.remove(worker)
        if worker.late is not None:
            worker.late.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for fd, writer in ((worker.answers_fd, False), (worker.jobs_fd, True)):
            if loop is not None:
                try:
                    loop.remove_writer(fd) if writer else loop.remove_reader(fd)
                except (ValueError, OSError):
                    pass
            try:
                os.close(fd)  # a healthy worker ends on its own when its input closes
            except OSError:
                pass
        worker.outbox.clear()
        if worker.answer is not None and not worker.answer.done():
            worker.answer.set_exception(MaskingWorkerError(f"the masking worker was stopped: {reason}"))
        if kill:
            worker.process.kill()
            _reap_later(worker.process)
            logger.warning("masking worker %s stopped: %s", worker.process.pid, reason)
        if not self._workers:
            # Nothing will ever take the jobs in line: they fail now, not at their timeout.
            self._fail_waiting(f"no masking worker is running: {reason}")
        return True


def _reap_later(process: subprocess.Popen, kill_after: float | None = None) -> None:
    """Collect a child's exit status without waiting on the loop (a SIGKILLed one is gone within ms);
    with kill_after, kill it if it has not ended by then."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop: a last look now; Popen's own clean-up collects it later
        process.poll()
        return
    started = loop.time()
    give_up = started + (kill_after or 0.0) + 5.0

    def look() -> None:
        if process.poll() is not None:
            return
        now = loop.time()
        if kill_after is not None and now >= started + kill_after:
            process.kill()
        if now < give_up:
            loop.call_later(0.1, look)

    look()


if __name__ == "__main__":
    _worker_main(sys.argv)
