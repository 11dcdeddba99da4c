"""Witnessed checkpoints: the kinds of witness, and `auditgate verify --witness` catching a cut tail, a deleted
newest file and a rolled-back log that verify alone passes."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from auditgate.audit.chain import (
    AuditWriter,
    audit_files,
    create_private_key_file,
    public_key_record,
)
from auditgate.audit.witness import (
    CheckpointFollower,
    DirectoryWitness,
    ExportWitness,
    HttpWitness,
    SyslogWitness,
    WitnessError,
    WitnessUnreadable,
    parse_witnesses,
    read_log_facts,
    start_check,
    witness_record,
)
from auditgate.cli import main as auditgate

DAY = 1_764_000_000


def _run(records, key, first_time, flows=3, stop=True):
    """One gateway run's entries: start, flows, a checkpoint per flow, and (if stop) a clean shutdown."""
    now = [first_time]
    writer = AuditWriter(records / "audit", key, clock=lambda: now[0])
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key())})
    for n in range(flows):
        now[0] += 1
        writer.append("note", {"n": n})
        writer.checkpoint("entries")
    if stop:
        writer.append("gateway_stop", {})
        writer.close()
    return writer


def _witness_everything(records, witness):
    """What the audit_witness addon does: every checkpoint of the log, sent to the witness."""
    follower = CheckpointFollower(records / "audit", from_end=False)
    for name, checkpoint in follower.poll():
        witness.send(witness_record(checkpoint, follower.log_id, "test", str(records), name))


@pytest.fixture
def key(tmp_path):
    return create_private_key_file(tmp_path / "keys" / "audit.pem")


def _verify(capsys, *args):
    code = auditgate(["verify", "--skip-flows", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_an_intact_log_matches_its_witness_and_without_one_verify_warns(tmp_path, key, capsys):
    records, witness_dir = tmp_path / "records", tmp_path / "witness"
    _run(records, key, DAY)
    _witness_everything(records, DirectoryWitness(witness_dir))
    code, out = _verify(capsys, records, "--witness", f"dir:{witness_dir}")
    assert code == 0 and "witnessed" in out and "nothing after it" in out
    code, out = _verify(capsys, records)
    assert code == 0 and "WARNING    tail unchecked" in out and "cannot be checked" in out


def test_a_tail_cut_after_a_checkpoint_passes_alone_and_fails_against_the_witness(tmp_path, key, capsys):
    records, witness_dir = tmp_path / "records", tmp_path / "witness"
    _run(records, key, DAY)
    _witness_everything(records, DirectoryWitness(witness_dir))
    [log] = audit_files(records / "audit")
    lines = log.read_bytes().splitlines(keepends=True)
    cut = max(i for i, line in enumerate(lines[:-3]) if b'"checkpoint"' in line) + 1
    log.write_bytes(b"".join(lines[:cut]))  # ends on a signed checkpoint: the chain alone looks whole
    code, out = _verify(capsys, records)
    assert code in (0, 3) and "WARNING" in out
    code, out = _verify(capsys, records, "--witness", f"dir:{witness_dir}")
    assert code == 1 and "cut tail" in out and f"the log ends at seq {cut}" in out


def test_a_deleted_newest_file_fails_against_the_witness_naming_it(tmp_path, key, capsys):
    records, witness_dir = tmp_path / "records", tmp_path / "witness"
    _run(records, key, DAY)
    _run(records, key, DAY + 100)  # a second run: a file of its own
    _witness_everything(records, DirectoryWitness(witness_dir))
    newest = audit_files(records / "audit")[-1]
    newest.unlink()
    assert _verify(capsys, records)[0] in (0, 3)
    code, out = _verify(capsys, records, "--witness", str(witness_dir))  # a bare path names a directory witness
    assert code == 1 and f"its file {newest.name}" in out and "deleted" in out


def test_a_restored_older_copy_fails_and_one_written_on_is_told_apart(tmp_path, key, capsys):
    records, witness_dir = tmp_path / "records", tmp_path / "witness"
    witness = DirectoryWitness(witness_dir)
    _run(records, key, DAY)
    old_copy = tmp_path / "old-copy"
    shutil.copytree(records, old_copy)
    _run(records, key, DAY + 100)
    _witness_everything(records, witness)
    shutil.rmtree(records)
    shutil.copytree(old_copy, records)
    code, out = _verify(capsys, records, "--witness", f"dir:{witness_dir}")
    assert code == 1 and "cut tail" in out and "an older copy of the log was restored" in out
    facts = read_log_facts(records)
    [problem] = start_check([witness], facts)  # the gateway would refuse to start on this copy
    assert "witness dir:" in problem and f"the log ends at seq {facts.last_seq}" in problem
    _run(records, key, DAY + 200, flows=5)  # the restored copy written on: the same seqs, other entries
    code, out = _verify(capsys, records, "--witness", f"dir:{witness_dir}")
    assert code == 1 and "rolled back" in out and "holds another entry there" in out
    assert start_check([witness], read_log_facts(records))


def test_a_new_log_or_a_witness_that_is_behind_does_not_block_a_start(tmp_path, key):
    records, witness = tmp_path / "records", DirectoryWitness(tmp_path / "witness")
    assert start_check([witness], read_log_facts(records)) == []  # no log yet
    _run(records, key, DAY)
    _witness_everything(records, witness)
    _run(records, key, DAY + 100)  # the log went on since (say the witness was unreachable)
    assert start_check([witness], read_log_facts(records)) == []


class _WitnessEndpoint(BaseHTTPRequestHandler):
    """A SIEM-like endpoint: keeps POSTed records, answers GET ?log_id= with the newest, or 405 if write-only."""

    def do_POST(self):
        record = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.records.append(record)
        self.send_response(self.server.post_status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        if self.server.write_only:
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        log_id = parse_qs(urlsplit(self.path).query).get("log_id", [""])[0]
        mine = [r for r in self.server.records if r["log_id"] == log_id]
        body = json.dumps(max(mine, key=lambda r: r["seq"])).encode() if mine else b""
        self.send_response(200 if mine else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WitnessEndpoint)
    server.records, server.write_only, server.post_status = [], False, 204
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_an_http_witness_takes_posts_and_is_read_back(tmp_path, key, endpoint, capsys):
    records = tmp_path / "records"
    url = f"http://127.0.0.1:{endpoint.server_port}/witness?tenant=a"
    witness = HttpWitness(url)
    _run(records, key, DAY)
    _witness_everything(records, witness)
    facts = read_log_facts(records)
    assert witness.latest(facts.log_id)["seq"] == facts.last_seq
    assert witness.latest("0" * 64) is None
    code, out = _verify(capsys, records, "--witness", url)
    assert code == 0 and "witnessed" in out
    endpoint.write_only = True
    with pytest.raises(WitnessUnreadable):
        witness.latest(facts.log_id)
    endpoint.post_status = 500
    with pytest.raises(WitnessError, match="answered 500"):
        witness.send(endpoint.records[-1])


def test_a_syslog_witness_sends_lines_an_export_of_which_verify_reads(tmp_path, key, capsys):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    records = tmp_path / "records"
    [witness] = parse_witnesses(f"syslog:127.0.0.1:{receiver.getsockname()[1]}")
    assert isinstance(witness, SyslogWitness) and not witness.readable
    _run(records, key, DAY, flows=2)
    _witness_everything(records, witness)
    facts = read_log_facts(records)
    lines = []
    try:
        while len(lines) < 10:  # up to the shutdown checkpoint, the log's last entry
            lines.append(receiver.recv(65536).decode())
            if f'"seq":{facts.last_seq},' in lines[-1]:
                break
    finally:
        receiver.close()
    assert all(line.startswith("<134>auditgate-witness: {") for line in lines)
    export = tmp_path / "syslog-export.log"
    export.write_text("".join(f"Nov 24 17:00:00 host {line[5:]}\n" for line in lines))
    assert ExportWitness(export).latest(facts.log_id)["seq"] == facts.last_seq
    code, out = _verify(capsys, records, "--witness", f"file:{export}")
    assert code == 0 and "witnessed" in out
    code, out = _verify(capsys, records, "--witness", "syslog:127.0.0.1:9")
    assert code == 2 and "cannot be read back" in out


def test_witness_option_text_is_checked():
    kinds = [type(w).__name__ for w in parse_witnesses("dir:/tmp/w, http://siem.example/x ,syslog:")]
    assert kinds == ["DirectoryWitness", "HttpWitness", "SyslogWitness"]
    for bad in ("ftp://x", "dir:", "syslog:host", "http://"):
        with pytest.raises(ValueError):
            parse_witnesses(bad)
