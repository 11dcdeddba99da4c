"""Helper processes of the gateway: started as plain Python scripts in their own session, talking over pipes.

Not multiprocessing: its spawned children re-import mitmdump's main module (a second or so) and
share the gateway's process group, so a Ctrl-C or a `kill -INT -<pgid>` at shutdown hits them while
they still hold work. A child started here runs only its own module, is out of reach of signals
sent to the gateway's group, and ends when its input pipe closes: when the gateway closes it, or
when the gateway dies, however it dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent  # the folder that holds the auditgate package


def start_child(module: str) -> tuple[subprocess.Popen, Connection, Connection]:
    """Run `python -P -m module <in-fd> <out-fd>`; returns the process, the end to send on and the end to read.

    -P and PYTHONPATH: the child imports auditgate from where the gateway has it and nothing from the gateway's
    working directory.
    """
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])))
    try:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", module, str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), start_new_session=True, stdin=subprocess.DEVNULL,
            env=env,
        )
    except BaseException:
        for fd in (to_child_w, from_child_r):
            os.close(fd)
        raise
    finally:
        os.close(to_child_r)
        os.close(from_child_w)
    return process, Connection(to_child_w, readable=False), Connection(from_child_r, writable=False)


def child_ends(argv: list[str]) -> tuple[Connection, Connection]:
    """In the child: (the end to read jobs from, the end to answer on), from the fds in argv."""
    return Connection(int(argv[1]), writable=False), Connection(int(argv[2]), readable=False)


def stop_child(process: subprocess.Popen, wait: float) -> int | None:
    """Wait for a child whose input was closed, killing it if it takes longer.

    Its exit code when it ended by itself (0: all done; anything else: it failed), None if it was killed.
    """
    try:
        return process.wait(wait)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return None
