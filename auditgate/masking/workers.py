"""Worker processes that mask whole bodies, each on its own pipe, answered through the event loop (no mitmproxy).

Why not concurrent.futures.ProcessPoolExecutor: it moves every job through a feeder thread and a
manager thread in the proxy process, and each hop wakes a thread and takes the GIL. Under load those
hand-offs cost the proxy's only event-loop thread more than the masking itself. Here a job is one
pipe write, its answer one read that the event loop is told about (add_reader): no threads.

A job that outlives the timeout has its worker killed and replaced, so a pathological body cannot
keep a worker busy for the next ones. Workers run in their own session (see child_process).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from auditgate.core.child_process import child_ends, start_child, stop_child
from auditgate.masking.config import MaskingSettings

logger = logging.getLogger(__name__)

WARM_UP_TEXT = "warm up: jane@example.com 4111 1111 1111 1111 DE89 3704 0044 0532 0130 00 +1 415-555-0100"


class MaskingWorkerError(RuntimeError):
    """A job could not be masked: an error in the worker, a timeout, or a worker that died."""


# ---- in the worker process -------------------------------------------------------------------------
def serve_jobs(jobs: Connection, answers: Connection) -> None:
    """A worker's life: settings in, build the masker, say ready, then answer (direction, kind, content
    type, body) jobs until the gateway closes the pipe."""
    from auditgate.masking.body import mask_body
    from auditgate.masking.engine import PiiMasker

    try:
        masker = PiiMasker(pickle.loads(jobs.recv_bytes()))
        masker.mask(WARM_UP_TEXT, "response")
    except EOFError:
        return
    except Exception as e:
        answers.send_bytes(pickle.dumps(("error", f"{type(e).__name__}: {e}")))
        return
    answers.send_bytes(pickle.dumps(("ready", os.getpid())))
    while True:
        try:
            direction, kind, content_type, body = pickle.loads(jobs.recv_bytes())
        except EOFError:
            return
        try:
            answer = ("ok", mask_body(masker, body, content_type, kind, direction))
        except Exception as e:  # reported to the gateway, which fails the flow closed
            answer = ("error", f"{type(e).__name__}: {e}")
        try:
            answers.send_bytes(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:  # the gateway is gone
            return


# ---- in the proxy process ----------------------------------------------------------------------------
@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen
    jobs: Connection
    answers: Connection
    answer: asyncio.Future | None = None  # the answer to the job in hand, or to the start-up
    ready: bool = False
    late: asyncio.TimerHandle | None = None  # set while an abandoned job's answer is still to come


@dataclass(eq=False)
class MaskingWorkers:
    """A fixed number of masking worker processes; jobs wait in line when all are busy."""

    settings: MaskingSettings
    count: int
    start_timeout: float = 120.0
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
        """(masked body or None, findings), from a worker within timeout seconds; else MaskingWorkerError."""
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

    def close(self, wait: float = 2.0) -> None:
        """Close every worker's pipes (they end on their own), then wait for them together, killing stragglers."""
        self._closed = True
        workers = list(self._workers)
        for worker in workers:
            self._retire(worker, reason="the gateway is stopping", kill=False)
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(MaskingWorkerError("the gateway is stopping"))
        self._waiting.clear()
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
            worker.jobs.send_bytes(pickle.dumps((direction, kind, content_type, body),
                                                protocol=pickle.HIGHEST_PROTOCOL))
            status, value = await worker.answer
        except asyncio.CancelledError:
            # Given up on (timed out, most often after waiting in line) while the worker has it: its
            # answer, when it comes, is dropped and the worker goes back to work. One that is still
            # busy a whole timeout later is stuck and is replaced.
            worker.answer = None
            if worker in self._workers:
                worker.late = loop.call_later(timeout, self._replace, worker, "a job ran far past the timeout")
            raise
        except OSError as e:
            self._replace(worker, f"its pipe failed: {e}")
            raise MaskingWorkerError(f"masking worker failed: {e}") from None
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
        waiter = loop.create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed a worker just as the wait was given up
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

    def _spawn(self, loop) -> _Worker:
        process, jobs, answers = start_child(__name__)
        worker = _Worker(process, jobs, answers, answer=loop.create_future())
        self._workers.append(worker)
        loop.add_reader(answers.fileno(), self._on_readable, worker)
        try:
            jobs.send_bytes(pickle.dumps(self.settings))
        except OSError:
            pass  # it is already gone: its end of the pipe reads EOF, and _on_readable retires it
        return worker

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
        """Retire a worker that was serving and start another in its place."""
        if not self._retire(worker, reason) or self._closed:
            return
        loop = asyncio.get_running_loop()
        try:
            fresh = self._spawn(loop)
        except OSError as e:
            logger.error("masking worker could not be replaced: %s", e)
            return

        async def ready() -> None:
            try:
                await self._await_ready(fresh)
            except MaskingWorkerError as e:
                logger.error("%s", e)

        loop.create_task(ready())

    def _on_readable(self, worker: _Worker) -> None:
        try:
            message = pickle.loads(worker.answers.recv_bytes())
        except (EOFError, OSError):
            message = None
        if message is None:  # the worker is gone (killed, crashed)
            if worker.ready:
                self._replace(worker, "it ended unexpectedly")
            else:  # one that never started is not replaced: it would fail again, forever
                self._retire(worker, reason="it ended during start-up")
            return
        if worker.late is not None:  # the answer to a job given up on: dropped
            worker.late.cancel()
            worker.late = None
            self._release(worker)
            return
        if worker.answer is not None and not worker.answer.done():
            worker.answer.set_result(message)

    def _retire(self, worker: _Worker, reason: str, kill: bool = True) -> bool:
        """Take a worker out of service; False if it already was."""
        if worker not in self._workers:
            return False
        self._workers.remove(worker)
        if worker.late is not None:
            worker.late.cancel()
        try:
            asyncio.get_running_loop().remove_reader(worker.answers.fileno())
        except (RuntimeError, ValueError, OSError):
            pass
        if worker.answer is not None and not worker.answer.done():
            worker.answer.set_exception(MaskingWorkerError(f"the masking worker was stopped: {reason}"))
        worker.jobs.close()  # a healthy worker ends on its own when its input closes
        worker.answers.close()
        if kill:
            worker.process.kill()
            try:
                worker.process.wait(5)
            except subprocess.TimeoutExpired:
                pass  # reaped later; it cannot take jobs any more
            logger.warning("masking worker %s stopped: %s", worker.process.pid, reason)
        return True


if __name__ == "__main__":
    serve_jobs(*child_ends(sys.argv))
