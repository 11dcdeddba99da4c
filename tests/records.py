"""Helpers to read what the gateway recorded."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import http, io


def flow_files(records: Path) -> list[Path]:
    return sorted((records / "flows").glob("*.mitm"))


def read_flows(records: Path) -> list[http.HTTPFlow]:
    flows = []
    for path in flow_files(records):
        with open(path, "rb") as f:
            flows.extend(io.FlowReader(f).stream())
    return flows


def files_containing(root: Path, needles: list[str]) -> list[tuple[Path, str]]:
    """Every (file, needle) where a needle occurs in a file below root, as bytes."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits.extend((path, n) for n in needles if n.encode() in data)
    return hits


def wait_for_flows(records: Path, predicate, count: int = 1, timeout: float = 10.0) -> list[http.HTTPFlow]:
    """The recorded flows matching predicate, once there are `count` of them.

    Flows are written just after their response has gone out, so a test that has its response may
    look a moment before the flow file has it.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = [f for f in read_flows(records) if predicate(f)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
