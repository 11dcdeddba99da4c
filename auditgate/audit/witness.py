"""Witnesses: copies of the audit log's signed checkpoints kept outside the records directory.

A checkpoint signs the chain's head (seq and hash). A witness remembers the newest one it was sent, so that
whoever later cuts the log's tail, deletes its newest file or restores an older copy of the records leaves
a log that ends before (or differs from) what the witness remembers. Three kinds:

- ``dir:/path`` — a second directory (another volume): one JSON Lines file per log, appended and fsynced;
  readable back.
- ``http://…`` / ``https://…`` — a JSON POST of each record (a SIEM, an object store with retention lock);
  readable back with ``GET <url>?log_id=<id>`` (200 with the newest record, 404 when it has none); an
  endpoint that answers that GET with 405 or 501 is write-only.
- ``syslog:`` (the local ``/dev/log``), ``syslog:/path/to/socket`` or ``syslog:host:port`` (UDP) — one
  line per record; write-only. An export of those lines is read back by ``auditgate verify --witness
  file:EXPORT``.

A log is named by its ``log_id``: the hash of its first entry (seq 1), which no later entry can change
and an older copy of the same log shares. Plain Python; no mitmproxy.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from auditgate.audit.chain import (
    AUDIT_SUBDIR,
    FILE_PATTERN,
    audit_files,
    parse_entry_line,
    utc_timestamp,
)
from auditgate.core.private_files import open_private_fd, private_dir

RECORD_VERSION = 1
SYSLOG_TAG = "auditgate-witness"
SYSLOG_PRIORITY = 16 * 8 + 6  # facility local0, severity informational
HTTP_TIMEOUT_SECONDS = 5.0
_LOG_ID_LENGTH = 64


class WitnessError(Exception):
    """A witness could not be written or read (unreachable, refused, damaged)."""


class WitnessUnreadable(WitnessError):
    """The witness takes records but cannot give them back (syslog, a write-only endpoint)."""


def witness_record(checkpoint: dict, log_id: str, instance: str | None, records_dir: str, file: str | None) -> dict:
    """What a witness keeps of one checkpoint: the entry itself (signed, hash-chained) and where it came from."""
    return {"witness_record": RECORD_VERSION, "log_id": log_id, "instance": checkpoint.get("instance") or instance,
            "records_dir": records_dir, "file": file, "seq": checkpoint.get("seq"), "hash": checkpoint.get("hash"),
            "sent_at": utc_timestamp(), "checkpoint": checkpoint}


def _valid_record(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("log_id"), str) and isinstance(value.get("seq"), int)
            and isinstance(value.get("hash"), str) and isinstance(value.get("checkpoint"), dict))


def _newest(records: Iterable[dict]) -> dict | None:
    return max((r for r in records if _valid_record(r)), key=lambda r: r["seq"], default=None)


# ---- the kinds ----------------------------------------------------------------------------------------


class DirectoryWitness:
    readable = True

    def __init__(self, path: Path, source: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self.source = source or f"dir:{self.path}"

    def _file(self, log_id: str) -> Path:
        if len(log_id) != _LOG_ID_LENGTH or not all(c in "0123456789abcdef" for c in log_id):
            raise WitnessError(f"not a log id: {log_id!r}")
        return self.path / f"witness-{log_id}.jsonl"

    def send(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        try:
            private_dir(self.path)
            fd = open_private_fd(self._file(record["log_id"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise WitnessError(f"{self.source}: {e.strerror or e}") from None

    def latest(self, log_id: str) -> dict | None:
        try:
            data = self._file(log_id).read_bytes()
        except FileNotFoundError:
            return None  # a new witness (its directory is made at the first send), or none of this log yet
        except OSError as e:
            raise WitnessError(f"{self.source}: {e.strerror or e}") from None
        return _newest(_json_lines(data))


class HttpWitness:
    readable = True

    def __init__(self, url: str, timeout: float = HTTP_TIMEOUT_SECONDS) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)  # shown in logs and records: never a password or token in the URL
        self.source = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        self.timeout = timeout
        # The gateway's own proxy settings (HTTPS_PROXY for callers) must not route its witness traffic.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def send(self, record: dict) -> None:
        body = json.dumps(record, sort_keys=True).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as e:
            raise WitnessError(f"{self.source}: answered {e.code}") from None
        except (OSError, ValueError) as e:
            raise WitnessError(f"{self.source}: {getattr(e, 'reason', None) or e}") from None

    def latest(self, log_id: str) -> dict | None:
        separator = "&" if urllib.parse.urlsplit(self.url).query else "?"
        url = f"{self.url}{separator}{urllib.parse.urlencode({'log_id': log_id})}"
        try:
            with self._opener.open(urllib.request.Request(url, method="GET"), timeout=self.timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code in (405, 501):
                raise WitnessUnreadable(f"{self.source}: cannot be read back (GET answered {e.code})") from None
            raise WitnessError(f"{self.source}: answered {e.code}") from None
        except (OSError, ValueError) as e:
            raise WitnessError(f"{self.source}: {getattr(e, 'reason', None) or e}") from None
        try:
            value = json.loads(data)
        except ValueError:
            raise WitnessError(f"{self.source}: its answer is not JSON") from None
        records = value if isinstance(value, list) else [value]
        newest = _newest(r for r in records if isinstance(r, dict) and r.get("log_id") == log_id)
        if newest is None and value:
            raise WitnessError(f"{self.source}: its answer is not a witness record of log {log_id[:16]}")
        return newest


class SyslogWitness:
    readable = False

    def __init__(self, address: str, source: str) -> None:
        self.source = source
        if not address or address.startswith("/"):
            self._family, self._address = socket.AF_UNIX, address or "/dev/log"
        else:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{source}: expected syslog:, syslog:/path/to/socket or syslog:host:port")
            self._family, self._address = socket.AF_INET, (host, int(port))

    def send(self, record: dict) -> None:
        line = f"<{SYSLOG_PRIORITY}>{SYSLOG_TAG}: {json.dumps(record, sort_keys=True, separators=(',', ':'))}"
        try:
            with socket.socket(self._family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(HTTP_TIMEOUT_SECONDS)
                sock.sendto(line.encode(), self._address)
        except OSError as e:
            raise WitnessError(f"{self.source}: {e.strerror or e}") from None

    def latest(self, log_id: str) -> dict | None:
        raise WitnessUnreadable(f"{self.source}: syslog cannot be read back; pass an export of its "
                                f"{SYSLOG_TAG} lines to `auditgate verify --witness file:PATH`")


class ExportWitness:
    """Lines holding witness records (a syslog export, a copy of a witness directory's file): read only."""

    readable = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        self.source = f"file:{self.path}"

    def send(self, record: dict) -> None:
        raise WitnessError(f"{self.source}: an export is read only")

    def latest(self, log_id: str) -> dict | None:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise WitnessError(f"{self.source}: {e.strerror or e}") from None
        return _newest(r for r in _json_lines(data, embedded=True) if r.get("log_id") == log_id)


def _json_lines(data: bytes, embedded: bool = False) -> Iterable[dict]:
    for raw in data.splitlines():
        text = raw.decode("utf-8", "replace")
        if embedded:  # a syslog line: the record starts at its first brace
            start = text.find("{")
            if start < 0:
                continue
            text = text[start:]
        try:
            value = json.loads(text)
        except ValueError:
            continue  # a line cut by a crash of the writer, or not ours
        if isinstance(value, dict):
            yield value


Witness = DirectoryWitness | HttpWitness | SyslogWitness | ExportWitness


def parse_witness(spec: str) -> Witness:
    """One witness from its option text; ValueError with what is expected."""
    spec = spec.strip()
    if spec.startswith("dir:") and spec[4:]:
        return DirectoryWitness(Path(spec[4:]), spec)
    if spec.startswith(("http://", "https://")):
        if not urllib.parse.urlsplit(spec).hostname:
            raise ValueError(f"witness {spec!r}: no host in the URL")
        return HttpWitness(spec)
    if spec.startswith("syslog:"):
        return SyslogWitness(spec[len("syslog:"):], spec)
    if spec.startswith("file:") and spec[5:]:
        return ExportWitness(Path(spec[5:]))
    raise ValueError(f"witness {spec!r}: expected dir:/path, http(s)://host/path, syslog:[address] or file:/path")


def parse_witnesses(option: str) -> list[Witness]:
    return [parse_witness(part) for part in option.split(",") if part.strip()]


def parse_witness_source(spec: str) -> Witness:
    """A witness for `auditgate verify --witness`: as in the option, or a bare path (a directory or an export)."""
    if ":" in spec.split("/")[0] or spec.startswith(("dir:", "file:", "syslog:")):
        return parse_witness(spec)
    path = Path(spec).expanduser()
    return DirectoryWitness(path) if path.is_dir() else ExportWitness(path)


# ---- comparing a log with what a witness remembers -------------------------------------------------------


@dataclass
class Disagreement:
    kind: str  # "behind": the log ends before the witnessed checkpoint; "diverged": it holds another entry there
    seq: int
    message: str


def compare(record: dict, entry_at: Callable[[int], dict | None], last_seq: int, files: list[str],
            source: str) -> Disagreement | None:
    """None when the log holds the witnessed checkpoint as it was sent; else what is wrong with the log."""
    seq, witnessed_hash = record["seq"], record["hash"]
    when = record.get("sent_at") or "at an unknown time"
    entry = entry_at(seq) if seq <= last_seq else None
    if entry is None:
        named = record.get("file")
        if isinstance(named, str) and FILE_PATTERN.match(named) and named not in files:
            how = (f"its file {named}, which held that checkpoint, is gone: the newest file was deleted, or an older "
                   "copy of the log was restored")
        else:
            how = "the entries after it were cut off, or an older copy of the log was restored"
        return Disagreement("behind", seq, f"{source} holds checkpoint seq {seq} (sent {when}), but the log ends at "
                                           f"seq {last_seq}: {how}")
    if entry.get("hash") != witnessed_hash:  # whether the hash matches the entry is the verifier's check
        return Disagreement("diverged", seq, f"{source} holds checkpoint seq {seq} with hash {witnessed_hash[:16]}… "
                                             f"(sent {when}), the log holds another entry there: the log was rolled "
                                             "back to an older copy and written on, or replaced")
    return None


# ---- reading the gateway's own log ----------------------------------------------------------------------


@dataclass
class LogFacts:
    """What the start check needs of a log, read without loading all of it."""

    audit_dir: Path
    files: list[str] = field(default_factory=list)
    log_id: str | None = None
    last_seq: int = 0
    last_checkpoint: tuple[str, dict] | None = None  # (file, entry)

    def entry_at(self, seq: int) -> dict | None:
        candidates = [name for name in self.files if int(FILE_PATTERN.match(name).group(1)) <= seq]
        for name in reversed(candidates):
            for entry in _entries(self.audit_dir / name):
                if entry.get("seq") == seq:
                    return entry
        return None


def _entries(path: Path) -> Iterable[dict]:
    try:
        data = path.read_bytes()
    except OSError:
        return
    for raw in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            yield parse_entry_line(raw)
        except ValueError:
            continue


def read_log_facts(records_dir: Path) -> LogFacts:
    audit_dir = Path(records_dir) / AUDIT_SUBDIR
    facts = LogFacts(audit_dir, [p.name for p in audit_files(audit_dir)])
    for name in facts.files:
        first = next(iter(_entries(audit_dir / name)), None)
        if first is not None:
            if first.get("seq") == 1 and isinstance(first.get("hash"), str):
                facts.log_id = first["hash"]
            break
    for name in reversed(facts.files):
        entries = list(_entries(audit_dir / name))
        if not entries:
            continue
        if not facts.last_seq:
            facts.last_seq = entries[-1].get("seq") if isinstance(entries[-1].get("seq"), int) else 0
        checkpoints = [e for e in entries if e.get("kind") == "checkpoint"]
        if checkpoints:
            facts.last_checkpoint = (name, checkpoints[-1])
            break
    return facts


def start_check(witnesses: list[Witness], facts: LogFacts) -> list[str]:
    """Problems that forbid starting on this log: a readable witness ahead of it or disagreeing with it,
    or one that cannot be read (then whether it is ahead cannot be known)."""
    problems = []
    if facts.log_id is None:
        return problems  # a new log: nothing any witness could hold of it
    for witness in witnesses:
        if not witness.readable:
            continue
        try:
            record = witness.latest(facts.log_id)
        except WitnessUnreadable:
            continue
        except WitnessError as e:
            problems.append(f"cannot read witness {witness.source} ({e}), so cannot tell whether the log was "
                            "rolled back")
            continue
        if record is None:
            continue
        disagreement = compare(record, facts.entry_at, facts.last_seq, facts.files, f"witness {witness.source}")
        if disagreement is not None:
            problems.append(disagreement.message)
    return problems


# ---- following the log as the gateway writes it ------------------------------------------------------------


class CheckpointFollower:
    """Reads the checkpoint entries appended to an audit directory since the last poll (complete lines only)."""

    def __init__(self, audit_dir: Path, from_end: bool = True) -> None:
        self.audit_dir = Path(audit_dir)
        self.file: str | None = None
        self.offset = 0
        self.log_id: str | None = None
        if from_end:
            files = audit_files(self.audit_dir)
            if files:
                self.file = files[-1].name
                size = files[-1].stat().st_size
                data = files[-1].read_bytes()[:size]
                self.offset = data.rfind(b"\n") + 1

    def poll(self) -> list[tuple[str, dict]]:
        found: list[tuple[str, dict]] = []
        for path in audit_files(self.audit_dir):
            if self.file is not None and path.name < self.file:
                continue
            if path.name != self.file:
                self.file, self.offset = path.name, 0
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            for raw in data[:end].splitlines():
                # Only checkpoints (and the first entry, the log's id) are parsed: the gateway writes many lines.
                if b'"checkpoint"' not in raw and self.log_id is not None:
                    continue
                try:
                    entry = parse_entry_line(raw)
                except ValueError:
                    continue  # the verifier reports it; a witness takes only checkpoints
                if entry.get("seq") == 1 and isinstance(entry.get("hash"), str):
                    self.log_id = entry["hash"]
                if entry.get("kind") == "checkpoint":
                    found.append((path.name, entry))
            self.offset += end
        return found


# ---- the verifier's side: `auditgate verify --witness` -------------------------------------------------------

UNWITNESSED, WITNESSED = "unwitnessed", "witnessed"
TAIL_UNCHECKED = ("no witness given (--witness): whether entries were cut off the end of the log, its newest file "
                  "deleted or an older copy of the records restored cannot be checked")


def log_id_of(log) -> str | None:
    """The hash of the log's first entry (seq 1), from the verifier's parsed log (a list of Located)."""
    first = next((l.entry for l in log if l.entry.get("seq") == 1), None)
    return first.get("hash") if first is not None and isinstance(first.get("hash"), str) else None


def check_tail(result, witnesses: list[Witness]) -> None:
    """Adds the witnesses' findings to a VerifyResult: a cut tail, a deleted newest file, a rolled-back log.

    Without a witness it adds nothing: the caller warns (TAIL_UNCHECKED). Raises WitnessError when a witness
    cannot be read (the caller says so and exits 2: unreadable evidence is not a verdict)."""
    from auditgate.audit.verify import FAILED, INCOMPLETE, NOTE

    where = f"{result.records_dir}/{AUDIT_SUBDIR}"
    by_seq: dict[int, dict] = {}
    for located in result.log:
        if isinstance(located.seq, int):
            by_seq.setdefault(located.seq, located.entry)
    last_seq = result.last_seq or 0
    log_id = log_id_of(result.log)
    for witness in witnesses:
        if not witness.readable:
            raise WitnessUnreadable(f"{witness.source} cannot be read back; pass an export of it (file:PATH)")
        record = witness.latest(log_id) if log_id else None
        if record is None:
            result.add(INCOMPLETE, UNWITNESSED, where, None,
                       f"witness {witness.source} holds no checkpoint of this log (log id "
                       f"{(log_id or 'unknown')[:16]}…): its tail cannot be checked against it")
            continue
        disagreement = compare(record, by_seq.get, last_seq, result.files, f"witness {witness.source}")
        if disagreement is not None:
            kind = "cut tail" if disagreement.kind == "behind" else "rolled back"
            result.add(FAILED, kind, where, disagreement.seq, disagreement.message)
            continue
        after = last_seq - record["seq"]
        result.add(NOTE, WITNESSED, where, record["seq"],
                   f"witness {witness.source} holds checkpoint seq {record['seq']} "
                   f"(sent {record.get('sent_at') or 'at an unknown time'}), "
                   "and the log holds it unchanged" + (f"; {after} entries after it are not witnessed yet" if after
                                                       else "; nothing after it"))
    if any(f.severity == FAILED for f in result.findings):
        result.status = FAILED
    elif any(f.severity == INCOMPLETE for f in result.findings):
        result.status = INCOMPLETE


def tail_status(result, witnessed: bool) -> str:
    """How far the log's end is vouched for, in words, from check_tail's findings."""
    if not witnessed:
        return "not checked (no witness)"
    broken = [f for f in result.findings if f.kind in ("cut tail", "rolled back")]
    if broken:
        return f"FAILED: {broken[0].kind} at seq {broken[0].seq}"
    seqs = [f.seq for f in result.findings if f.kind == WITNESSED and isinstance(f.seq, int)]
    if seqs:
        return f"witnessed up to seq {min(seqs)}"
    return "no witnessed checkpoint"
