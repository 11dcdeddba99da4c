"""Writes flow states to mitmproxy flow files in a child process, so their encoding costs the proxy nothing.

mitmproxy's flow format is tnetstring, encoded in pure Python: about half a millisecond of the proxy
process's only thread per flow. The proxy hands batches of flow states over a pipe instead
(pickled, which is C and cheap); the child encodes and appends them. The child runs in its own
session (see child_process) and exits when the pipe closes, after writing everything it was
given: a gateway that is interrupted, or killed, loses no flow it had already handed over.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Any

from auditgate.core.child_process import child_ends, start_child, stop_child

logger = logging.getLogger(__name__)


def flow_state(flow) -> dict[str, Any]:
    """``flow.get_state()``, with the metadata copied by a plain walk instead of ``copy.deepcopy``.

    The metadata is the gateway's record of a flow (identity, decisions, findings): dicts and lists of
    scalars, as mitmproxy requires for flow files. ``deepcopy``'s memo and dispatch made up a third of
    taking a flow's state; the copy here gives the same result for those types, and falls back to
    ``deepcopy`` for anything else.
    """
    metadata = flow.metadata
    flow.metadata = {}
    try:
        state = flow.get_state()
    finally:
        flow.metadata = metadata
    state["metadata"] = _plain_copy(metadata)
    return state


def _plain_copy(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {key: _plain_copy(item) for key, item in value.items()}
    if kind is list:
        return [_plain_copy(item) for item in value]
    if kind in (str, bytes, int, float, bool) or value is None:
        return value
    return copy.deepcopy(value)


def write_batches(jobs: Connection, answers: Connection) -> None:
    """The child's loop: batches of (path, state) in, appended to their files; errors reported back."""
    from mitmproxy.io import tnetstring

    files: dict[str, Any] = {}
    try:
        while True:
            try:
                data = jobs.recv_bytes()
            except EOFError:  # the gateway closed the pipe, or is gone: all it sent has been written
                break
            by_path: dict[str, list[bytes]] = {}
            for path, state in pickle.loads(data):
                try:
                    by_path.setdefault(path, []).append(tnetstring.dumps(state))
                except (TypeError, ValueError) as e:  # one flow that cannot be encoded loses only itself
                    answers.send(f"could not record flow {state.get('id')} to {path}: {e}")
            for path, encoded in by_path.items():
                file, size = files.get(path), None
                try:
                    if file is None:
                        for old in files.values():  # the gateway has moved on to a new file
                            old.close()
                        files.clear()
                        file = files[path] = open(path, "ab")
                    size = file.tell()
                    # One buffered write and a flush per batch: all of it, or an error.
                    file.write(b"".join(encoded))
                    file.flush()
                except OSError as e:
                    answers.send(f"could not record {len(encoded)} flow(s) to {path}: {e}")
                    # Cut a half-written batch off, so what follows can still be read back.
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
    finally:
        for file in files.values():
            file.close()


class FlowFileWriter:
    """The gateway's end: starts the child on first use and hands it batches of flow states."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._jobs: Connection | None = None
        self._answers: Connection | None = None

    def start(self) -> None:
        if self._jobs is None:
            self._process, self._jobs, self._answers = start_child(__name__)

    def write(self, batch: list[tuple[str, dict[str, Any]]]) -> int:
        """Hand over (path, state) pairs; returns their size in bytes (about their size in the files).

        Raises OSError when no writer process can take them.
        """
        data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        self.start()
        try:
            self._jobs.send_bytes(data)
        except OSError:  # the child died (killed from outside): start another and hand it the batch
            logger.error("the flow file writer process ended unexpectedly; starting a new one")
            self._stop(wait=0)
            self.start()
            self._jobs.send_bytes(data)
        self.report_errors()
        return len(data)

    def report_errors(self) -> None:
        try:
            while self._answers is not None and self._answers.poll():
                logger.error("%s", self._answers.recv())
        except (EOFError, OSError):
            pass

    def close(self, wait: float = 30.0) -> None:
        """Let the child write everything handed to it, then end it."""
        self._stop(wait)

    def _stop(self, wait: float) -> None:
        if self._jobs is not None:
            self._jobs.close()  # the child writes what it has, then sees the end of its input
        if self._process is not None:
            code = stop_child(self._process, wait)
            if code is None:
                logger.error("the flow file writer did not finish within %gs; it was ended", wait)
            elif code != 0:
                logger.error("the flow file writer failed (exit code %d); flows handed to it may be missing", code)
        self.report_errors()
        if self._answers is not None:
            self._answers.close()
        self._process, self._jobs, self._answers = None, None, None


if __name__ == "__main__":
    write_batches(*child_ends(sys.argv))
