"""Noticing, cheaply and at most once a second, that a rules file changed on disk."""

from __future__ import annotations

import os
import time
from pathlib import Path

CHECK_INTERVAL_SECONDS = 1.0


class ChangedFile:
    """Says whether a file was modified (or appeared, or vanished) since it was last looked at."""

    def __init__(self, path: Path, interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self.path = path
        self.interval = interval
        self._stamp = self._read_stamp()
        self._next_check = time.monotonic() + interval

    def _read_stamp(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def changed(self, now: bool = False) -> bool:
        """Whether the file changed; looked at once per interval, or at once with now=True."""
        # Called on every request: a clock read, and a stat() once per interval.
        clock = time.monotonic()
        if not now and clock < self._next_check:
            return False
        self._next_check = clock + self.interval
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def check_now(self) -> None:
        """Make the next changed() look at the file and report it changed."""
        self._next_check, self._stamp = 0.0, -1
