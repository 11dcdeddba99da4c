"""ChangedFile: the throttled change check every reloading addon shares."""

from __future__ import annotations

import os

from auditgate.core.file_watch import ChangedFile


def test_reports_a_change_once_and_only_after_the_interval(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("a: 1\n")
    watch = ChangedFile(path, interval=0.0)
    assert watch.changed() is False
    path.write_text("a: 2\n")
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    assert watch.changed() is True
    assert watch.changed() is False

    slow = ChangedFile(path, interval=3600)
    os.utime(path, ns=(2, 2))
    assert slow.changed() is False  # not looked at again within the interval
    slow.check_now()
    assert slow.changed() is True


def test_a_file_that_appears_or_vanishes_is_a_change(tmp_path):
    path = tmp_path / "policy.yaml"
    watch = ChangedFile(path, interval=0.0)
    assert watch.changed() is False
    path.write_text("default: allow\n")
    assert watch.changed() is True
    path.unlink()
    assert watch.changed() is True
