"""The masking worker processes (real child processes, no mitmproxy): answers, timeouts, deaths, start-up errors."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import threading

import pytest

from auditgate.masking.body import mask_body
from auditgate.masking.config import load_masking_settings
from auditgate.masking.engine import PiiMasker
from auditgate.masking.workers import MaskingBusy, MaskingWorkerError, MaskingWorkers
from tests.masking_fixtures import PII_SENTENCE, PII_VALUES, shipped_rules


def _reply(text: str) -> bytes:
    return json.dumps({"object": "response", "id": "resp_1", "output": [{"type": "message", "role": "assistant",
                       "content": [{"type": "output_text", "text": text}]}]}).encode()


@pytest.fixture(scope="module")
def settings():
    return load_masking_settings(shipped_rules())


@pytest.fixture(scope="module")
def unstartable(settings):
    """Settings no worker can start with: an NLP model that is not installed."""
    return dataclasses.replace(settings, nlp_model="no_such_spacy_model_package")




def _big_reply() -> bytes:
    """Seconds of masking work: a job still running when a test times it out or kills its worker."""
    return _reply(" ".join([PII_SENTENCE] * 3000))


def _run(scenario):
    return asyncio.run(scenario())


@contextlib.asynccontextmanager
async def _pool(settings, count: int = 1, start: bool = True):
    workers = MaskingWorkers(settings, count)
    try:
        if start:
            await workers.start()
        yield workers
    finally:
        workers.close()


def test_a_worker_masks_a_body_exactly_as_this_process_would(settings):
    body = _reply(PII_SENTENCE)
    expected = mask_body(PiiMasker(settings), body, "application/json", "responses", "response")

    async def scenario():
        async with _pool(settings, 2) as workers:
            return await asyncio.gather(*(workers.mask("response", "responses", "application/json", body, 30)
                                          for _ in range(5)))  # more jobs than workers: they wait in line

    answers = _run(scenario)
    assert all(answer == expected for answer in answers)
    new_body, findings = answers[0]
    assert new_body and not [v for v in PII_VALUES.values() if v.encode() in new_body]
    assert ("EMAIL_ADDRESS", "output[0].content[0].text") in findings


def test_a_job_that_times_out_fails_and_a_worker_stuck_on_it_is_replaced(settings):
    async def scenario():
        async with _pool(settings, 1) as workers:
            [first] = workers._workers
            with pytest.raises(MaskingWorkerError, match="timed out"):
                await workers.mask("response", "responses", "application/json", _big_reply(), 0.01)
            # Still busy a whole timeout later: stuck, so it is killed rather than left to finish.
            for _ in range(200):
                if first.process.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            assert first.process.returncode == -signal.SIGKILL
            # A new worker takes the next job.
            new_body, findings = await workers.mask("response", "responses", "application/json",
                                                    _reply(PII_SENTENCE), 60)
            assert findings and workers._workers[0] is not first

    _run(scenario)


def test_a_worker_killed_from_outside_fails_its_job_and_is_replaced(settings):
    async def scenario():
        async with _pool(settings, 1) as workers:
            [first] = workers._workers
            job = asyncio.ensure_future(workers.mask("response", "responses", "application/json", _big_reply(), 60))
            await asyncio.sleep(0.2)
            os.kill(first.process.pid, signal.SIGKILL)
            with pytest.raises(MaskingWorkerError, match="stopped"):
                await job
            _, findings = await workers.mask("response", "responses", "application/json", _reply(PII_SENTENCE), 60)
            assert findings

    _run(scenario)


def test_workers_run_outside_the_gateways_process_group(settings):
    # A Ctrl-C (SIGINT to the whole group) must not kill them before the gateway has shut down.
    async def scenario():
        async with _pool(settings, 1) as workers:
            return os.getpgid(workers._workers[0].process.pid)

    assert _run(scenario) != os.getpgid(0)


def test_a_worker_that_cannot_start_says_why(unstartable):
    async def scenario():
        async with _pool(unstartable, 1):
            pass

    with pytest.raises(MaskingWorkerError, match="could not start.*'no_such_spacy_model_package' is not installed"):
        _run(scenario)


def test_an_undecodable_text_body_is_an_error_not_a_pass(settings):
    async def scenario():
        async with _pool(settings, 1) as workers:
            await workers.mask("response", "other", "text/plain", b"\xff\xfe not utf-8", 30)

    with pytest.raises(MaskingWorkerError, match="not UTF-8"):
        _run(scenario)


def test_a_pool_not_started_explicitly_starts_on_its_first_job(settings):
    # As after a configuration change at run time, when the running hook has already passed.
    async def scenario():
        async with _pool(settings, 1, start=False) as workers:
            return await workers.mask("response", "responses", "application/json", _reply(PII_SENTENCE), 60)

    _, findings = _run(scenario)
    assert findings


def test_with_no_worker_running_a_job_fails_at_once(unstartable):
    async def scenario():
        async with _pool(unstartable, 1, start=False) as workers:
            with pytest.raises(MaskingWorkerError):
                await workers.start()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(MaskingWorkerError, match="no masking worker is running"):
                await workers.mask("response", "responses", "application/json", _reply(PII_SENTENCE), 30)
            return loop.time() - started

    assert _run(scenario) < 5  # not the whole timeout: nothing could ever take the job


# ---- back-pressure and a loop that never waits on a pipe ---------------------------------------------
def test_a_full_line_of_waiting_jobs_refuses_new_ones_at_once(settings):
    async def scenario():
        workers = MaskingWorkers(settings, 1, queue_max=1)
        try:
            await workers.start()
            [worker] = workers._workers
            os.kill(worker.process.pid, signal.SIGSTOP)  # busy for as long as the test wants
            jobs = [asyncio.ensure_future(workers.mask("response", "responses", "application/json",
                                                       _reply(PII_SENTENCE), 30)) for _ in range(2)]
            await asyncio.sleep(0.1)
            assert workers.waiting == 1  # one with the worker, one in line: the line is full
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(MaskingBusy, match="busy"):
                await workers.mask("response", "responses", "application/json", _reply(PII_SENTENCE), 30)
            refused_after = loop.time() - started
            os.kill(worker.process.pid, signal.SIGCONT)
            answers = await asyncio.gather(*jobs)  # the ones taken are served
            return refused_after, answers
        finally:
            workers.close()

    refused_after, answers = _run(scenario)
    assert refused_after < 0.1 and all(findings for _, findings in answers)


def test_a_worker_that_stops_reading_never_stalls_the_event_loop(settings):
    """A body far larger than a pipe's buffer, to a worker frozen from outside (SIGSTOP): the job times
    out, and meanwhile the loop keeps running other work."""
    async def scenario():
        async with _pool(settings, 1) as workers:
            [worker] = workers._workers
            os.kill(worker.process.pid, signal.SIGSTOP)
            # Let it go again in any case, so a loop that did block is released and the test ends.
            thaw = threading.Timer(4.0, os.kill, (worker.process.pid, signal.SIGCONT))
            thaw.start()
            loop = asyncio.get_running_loop()
            gaps, last, stop = [], loop.time(), False

            async def tick():
                nonlocal last
                while not stop:
                    await asyncio.sleep(0.01)
                    gaps.append(loop.time() - last)
                    last = loop.time()

            ticker = asyncio.ensure_future(tick())
            body = _reply("x" * (4 << 20))  # 4 MB: the pipe takes 64 KB
            with pytest.raises(MaskingWorkerError, match="timed out"):
                await workers.mask("response", "responses", "application/json", body, 1.0)
            stop = True
            await ticker
            thaw.cancel()
            os.kill(worker.process.pid, signal.SIGCONT)
            return max(gaps)

    assert _run(scenario) < 0.5


def test_jobs_in_line_when_the_only_worker_dies_wait_for_its_replacement(settings):
    async def scenario():
        async with _pool(settings, 1) as workers:
            [first] = workers._workers
            busy = asyncio.ensure_future(workers.mask("response", "responses", "application/json", _big_reply(), 60))
            await asyncio.sleep(0.2)
            waiting = asyncio.ensure_future(workers.mask("response", "responses", "application/json",
                                                         _reply(PII_SENTENCE), 60))
            await asyncio.sleep(0.05)
            os.kill(first.process.pid, signal.SIGKILL)
            with pytest.raises(MaskingWorkerError, match="stopped"):
                await busy
            _, findings = await waiting
            return findings, workers._workers[0] is not first

    findings, replaced = _run(scenario)
    assert findings and replaced


def test_one_engine_however_many_threads_ask_at_once(tmp_path):
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from auditgate.core.shipped import SHIPPED_RULES
    from auditgate.masking.engine import shared_masker

    rules = shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    (rules / "masking.yaml").write_text((rules / "masking.yaml").read_text() + "\n# this test's own\n")
    with ThreadPoolExecutor(4) as pool:
        engines = list(pool.map(lambda _: shared_masker(load_masking_settings(rules)), range(4)))
    assert all(engine is engines[0] for engine in engines)
