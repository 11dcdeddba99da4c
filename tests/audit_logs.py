"""Builds real audit logs (the gateway's own writer, flows written by mitmproxy's io) and tampers with them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import io
from mitmproxy.test import tflow

from auditgate.audit.chain import (
    AuditWriter,
    WriterSettings,
    audit_files,
    create_private_key_file,
    parse_entry_line,
    public_key_pem,
    public_key_record,
    seal,
)
from auditgate.audit.entries import flow_fields, record_fields


@dataclass
class BuiltLog:
    records: Path
    pubkey: Path
    key: Path

    @property
    def audit_dir(self) -> Path:
        return self.records / "audit"

    def files(self) -> list[Path]:
        return audit_files(self.audit_dir)

    def lines(self, path: Path) -> list[bytes]:
        return path.read_bytes().splitlines(keepends=True)

    def locate(self, seq: int) -> tuple[Path, int]:
        """(file, 0-based line index) of an entry."""
        for path in self.files():
            for index, line in enumerate(self.lines(path)):
                if parse_entry_line(line)["seq"] == seq:
                    return path, index
        raise KeyError(seq)

    def entry(self, seq: int) -> dict:
        path, index = self.locate(seq)
        return parse_entry_line(self.lines(path)[index])

    def seqs_of_kind(self, kind: str) -> list[int]:
        return [parse_entry_line(l)["seq"] for p in self.files() for l in self.lines(p) if parse_entry_line(l)["kind"] == kind]


def _flow(i: int, run: int):
    flow = tflow.tflow(resp=True)
    flow.request.content = json.dumps({"model": "gpt-test", "input": f"run {run} request {i}"}).encode()
    flow.response.content = json.dumps({"output": f"answer {i}"}).encode()
    flow.metadata["auditgate.identity"] = {"name": "alice" if i % 2 else "bob", "groups": ["agents"],
                                           "method": "service_token"}
    return flow


def run_gateway_once(records: Path, key, run: int, flows: int, checkpoint_entries: int = 4) -> None:
    """What one gateway run leaves behind: a flow file and a file of audit entries."""
    writer = AuditWriter(records / "audit", key, WriterSettings(checkpoint_entries=checkpoint_entries))
    writer.append("gateway_start", {"pid": run, "signing_key": public_key_record(key.public_key())})
    flow_dir = records / "flows"
    flow_dir.mkdir(parents=True, exist_ok=True)
    name = f"flows-run{run}.mitm"
    with open(flow_dir / name, "ab") as f:
        writer_io = io.FlowWriter(f)
        for i in range(flows):
            flow = _flow(i, run)
            flow.metadata["auditgate.flow_file"] = name
            entry = writer.append("flow", flow_fields(flow, time.time()))
            writer.append("record", record_fields(flow, entry["seq"]))  # as the gateway does, when it takes the record
            writer_io.add(flow)
    writer.append("gateway_stop", {"pid": run})
    writer.close()


def build_log(tmp: Path, runs: int = 2, flows: int = 6) -> BuiltLog:
    records, key_path = tmp / "records", tmp / "keys" / "audit-signing-key.pem"
    key = create_private_key_file(key_path)
    for run in range(1, runs + 1):
        run_gateway_once(records, key, run, flows)
    pubkey = tmp / "keys" / "audit-public.pem"
    pubkey.write_bytes(public_key_pem(key.public_key()))
    return BuiltLog(records, pubkey, key_path)


def rewrite_line(path: Path, index: int, change) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    entry = parse_entry_line(lines[index])
    change(entry)
    lines[index] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))


def rechain(log: BuiltLog) -> None:
    """What an attacker without the key can do after a change: recompute every seq, prev and hash."""
    prev = "0" * 64
    for path in log.files():
        out = []
        for line in path.read_bytes().splitlines(keepends=True):
            entry = parse_entry_line(line)
            entry.pop("hash")
            entry["prev"] = prev
            sealed, data = seal(entry)
            prev = sealed["hash"]
            out.append(data)
        path.write_bytes(b"".join(out))
