"""CPU time of a process and everything below it, to the nanosecond where Linux allows (benchmarks).

The process, its threads and its child processes (masking workers, the flow writer), sharper than
utime+stime alone: utime+stime come in 10 ms ticks, too coarse for a load generator or an upstream that
spends tens of microseconds per request over a few hundred requests. Each process counts as the larger of
  - the sum of its live threads' /proc/<pid>/task/<tid>/schedstat (time on a CPU, in ns): exact, but a thread
    that has ended takes its time with it (a ThreadingHTTPServer's per-connection threads), and
  - its utime+stime, which keeps ended threads' time but is truncated to ticks (at most 2 low).
So it is exact while the threads live on (asyncio executors, HAProxy's threads) and never more than 2 ticks
out otherwise. Ended child processes are not counted.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")
_SCHEDSTAT = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat")


def _scan() -> tuple[dict[int, list[int]], dict[int, float]]:
    """Every process's children, and its utime+stime in seconds."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            ticks[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return children, ticks


def _live_threads_seconds(pid: int) -> float:
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return total / 1e9


def cpu_seconds(*pids: int) -> dict[int, float]:
    """For each pid: the CPU time used so far by it and every live process below it (one scan of /proc)."""
    children, ticks = _scan()
    out = {}
    for pid in pids:
        total, todo = 0.0, [pid]
        while todo:
            current = todo.pop()
            own = ticks.get(current, 0.0)
            total += max(own, _live_threads_seconds(current)) if _SCHEDSTAT else own
            todo += children.get(current, [])
        out[pid] = total
    return out
