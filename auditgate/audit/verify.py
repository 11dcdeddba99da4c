"""The offline verifier: chain links, checkpoint signatures and flow-file digests of an audit log.

Reads every format: version 3 ("v": 3, RFC 8785 hashing) has intents (a request about to go upstream) and,
per flow, a record entry with the whole-flow digest (every field a flow record claims) written as the record
is taken; version 2 carries that digest in the flow entry itself; version 1 (no "v") the two body digests only,
and is checked on those.

Plain Python plus `cryptography` and `rfc8785`; no mitmproxy. docs/auditors.md ("Verifying") describes
the same algorithm step by step.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from auditgate.audit.chain import (
    AUDIT_SUBDIR,
    FORMAT_VERSION,
    GENESIS_HASH,
    PUBLIC_KEY_FILE,
    audit_files,
    checkpoint_message,
    entry_hash,
    key_id,
    load_public_key_pem,
    parse_entry_line,
    public_key_from_record,
    rotation_message,
    verify_signature,
)
from auditgate.audit.flow_files import MAX_DEPTH, FlowFile, FlowRecord, read_flow_files
from auditgate.audit.record_digest import ERROR_FIELD, differing_fields

FAILED, INCOMPLETE, NOTE = "failed", "incomplete", "note"
RECORDS_LOST_EVENT = "records_lost"  # the gateway's own report of flows whose records did not reach a file
REFUSED_UNAVAILABLE = ("gateway_audit_unavailable", "gateway_records_unavailable")
RECORD_EVENT = "record"  # format 3: the digest of a flow's record, field by field; it names its flow entry's seq
READ_VERSIONS = (1, 2, FORMAT_VERSION)  # 2: the whole-flow digest in the flow entry; 3: in a record entry
INTENT_EVENT = "intent"  # a request about to go upstream; its outcome (a flow entry) names its seq
OUTCOME_UNKNOWN = "outcome unknown"  # the finding kind of an intent without an outcome: not tampering
EXIT_CODES = {"verified": 0, FAILED: 1, INCOMPLETE: 3}


@dataclass
class Finding:
    severity: str  # failed: tampering or inconsistency; incomplete: cannot be fully verified; note
    kind: str
    where: str
    seq: int | None
    message: str


@dataclass
class Located:
    entry: dict
    file: str
    line: int

    @property
    def seq(self):
        return self.entry.get("seq")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line} (seq {_shown(self.seq, 'missing')})"


@dataclass
class VerifyResult:
    records_dir: str
    status: str = "verified"
    files: list[str] = field(default_factory=list)
    entries: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    signed_upto: int = 0
    anchors: list[str] = field(default_factory=list)
    anchor_source: str = ""
    keys_seen: list[str] = field(default_factory=list)
    flow_entries: int = 0
    flows_matched: int = 0
    flows_lost_reported: int = 0  # flow entries without a record whose loss the gateway reported itself
    flow_files: int = 0
    format_versions: list[int] = field(default_factory=list)  # entry format versions seen (1: no "v")
    intents: int = 0  # intent entries: requests the gateway was about to send upstream
    outcome_unknown: int = 0  # intents without an outcome entry: forwarded, outcome unknown (gateway stopped)
    streams_cut: int = 0  # flow entries of streams that ended in an error, recorded with what the client got
    replies_withheld: int = 0  # intents whose reply was refused because the log could not take the outcome
    refused_unaudited_ids: set[str] = field(default_factory=set, repr=False)  # from the flow files
    findings: list[Finding] = field(default_factory=list)
    log: list[Located] = field(default_factory=list, repr=False)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    @property
    def first_break(self) -> Finding | None:
        """The failure nearest the start of the log (in file and line order)."""
        order = {located.where: index for index, located in enumerate(self.log)}
        files = {name: index for index, name in enumerate(self.files)}

        def position(finding: Finding) -> tuple:
            if finding.where in order:
                return (order[finding.where], 0)
            name = finding.where.split(":")[0].split("@")[0]
            start = next((i for i, l in enumerate(self.log) if l.file == name), len(self.log))
            return (start if name in files else len(self.log), 1)

        return min((f for f in self.findings if f.severity == FAILED), key=position, default=None)

    def add(self, severity: str, kind: str, where: str, seq: int | None, message: str) -> None:
        self.findings.append(Finding(severity, kind, where, seq, message))

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("log")
        data.pop("refused_unaudited_ids")  # working state of the flow-file check, not a finding
        data["exit_code"] = self.exit_code
        return data

    def summary(self) -> str:
        lines = [f"auditgate verify: {self.records_dir}"]
        if self.files:
            span = f"seq {self.first_seq}..{self.last_seq}" if self.entries else "no readable entry"
            lines.append(f"  audit log: {len(self.files)} file(s), {self.entries} entries "
                         f"({span}), {self.checkpoints} checkpoint(s)")
        lines.append(f"  trusted key(s): {', '.join(k[:16] for k in self.anchors) or 'none'} ({self.anchor_source})")
        lines.append(f"  signed: entries up to seq {self.signed_upto} are covered by a checkpoint signed with a trusted key")
        what = ("every recorded field" if 1 not in self.format_versions else
                "request and response body digests" if self.format_versions == [1] else
                "every recorded field for format 2 and 3 entries, the bodies for format 1")
        lines.append(f"  flows: {self.flows_matched} of {self.flow_entries} flow entries matched their record "
                     f"in {self.flow_files} flow file(s) ({what})")
        if self.intents:
            lines.append(f"  intents: {self.intents} request(s) about to go upstream; {self.outcome_unknown} "
                         "forwarded with outcome unknown (gateway stopped)")
        if self.streams_cut:
            lines.append(f"  streams cut: {self.streams_cut} (recorded with what the client received)")
        if self.flows_lost_reported:
            lines.append(f"  flows: {self.flows_lost_reported} flow record(s) lost and reported lost by the gateway "
                         "itself (not tampering; see the findings)")
        for finding in self.findings:
            lines.append(f"  {finding.severity.upper():10s} {finding.kind}: {finding.where}: {finding.message}")
        verdict = {
            "verified": "VERIFIED: every link, every checkpoint signature and every flow digest checks out",
            FAILED: f"FAILED: the log was altered or is inconsistent; first break at {self.first_break.where}"
            if self.first_break else "FAILED",
            INCOMPLETE: "INCOMPLETE: no sign of tampering, but part of the log cannot be verified (see above)",
        }[self.status]
        lines.append(f"  result: {verdict}")
        return "\n".join(lines)


def _read_log(audit_dir: Path, result: VerifyResult) -> dict[str, dict]:
    """Parse every line; returns per-file facts (last complete line, partial tail)."""
    files: dict[str, dict] = {}
    for path in audit_files(audit_dir):
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        info = {"valid_size": end, "partial": data[end:], "lines": 0, "first": None, "last": None, "bad_last": False}
        files[path.name] = info
        result.files.append(path.name)
        for number, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
            info["lines"] = number
            try:
                entry = parse_entry_line(raw)
            except ValueError as e:
                result.add(FAILED, "unreadable", f"{path.name}:{number}", None,
                           f"not a valid entry ({e}): the line was edited or damaged")
                result.log.append(Located({"unreadable": True}, path.name, number))
                continue
            located = Located(entry, path.name, number)
            result.log.append(located)
            info["first"] = info["first"] or located
            info["last"] = located
    return files


def _check_chain(result: VerifyResult) -> None:
    log = result.log
    positions: dict[int, int] = {}
    for index, located in enumerate(log):
        if isinstance(located.seq, int):
            positions.setdefault(located.seq, index)
    expected_seq, expected_prev = 1, GENESIS_HASH
    seen: dict[int, Located] = {}
    previous: Located | None = None
    after_unreadable = False
    newest = 1  # the newest format seen so far: the gateway never writes an older one after it
    for index, located in enumerate(log):
        entry = located.entry
        if entry.get("unreadable"):
            after_unreadable, expected_seq = True, expected_seq + 1
            previous = None
            continue
        seq = entry.get("seq")
        if not isinstance(seq, int) or not isinstance(entry.get("hash"), str):
            result.add(FAILED, "malformed", located.where, None, "the entry has no integer seq or no hash")
            continue
        version = entry.get("v", 1)
        if version not in result.format_versions:
            result.format_versions.append(version)
        if version not in READ_VERSIONS:
            result.add(FAILED, "unknown format", located.where, seq,
                       f"format version {version!r}: this verifier reads versions 1 to {FORMAT_VERSION}")
        elif version < newest:
            result.add(FAILED, "downgraded", located.where, seq,
                       f"a format {version} entry after format {newest} entries: the gateway never writes one; "
                       "it was put there")
        else:
            newest = version
        try:
            intact = entry["hash"] == entry_hash(entry)
        except ValueError:  # not representable in its format's canonical JSON (RFC 8785 refuses it)
            intact = False
        if not intact:
            result.add(FAILED, "modified", located.where, seq,
                       "its content does not match its hash: the entry was edited")
        linked = seq == expected_seq and entry.get("prev") == expected_prev
        if not linked and not after_unreadable:
            result.add(FAILED, *_classify_break(located, previous, expected_seq, seen, positions, index))
        after_unreadable = False
        seen.setdefault(seq, located)
        previous = located
        expected_seq, expected_prev = seq + 1, entry["hash"]


def _classify_break(located: Located, previous: Located | None, expected_seq: int, seen: dict, positions: dict,
                    index: int) -> tuple[str, str, int, str]:
    seq, entry = located.seq, located.entry
    if previous is not None and previous.entry.get("prev") == entry.get("prev"):
        # Two entries claim the same predecessor and this one is the original: the one before was slipped in.
        return ("inserted", previous.where, previous.seq,
                f"this entry does not belong to the chain: the next entry ({located.where}) links past it")
    if seq in seen:
        return ("reordered", located.where, seq,
                f"seq {seq} was already seen at {seen[seq].where}: entries were duplicated or moved")
    if seq > expected_seq and all(s in seen for s in range(expected_seq, seq)):
        return ("reordered", located.where, seq, "the entries before it were moved: it no longer follows its predecessor")
    if seq > expected_seq:
        later = positions.get(expected_seq)
        if later is not None and later > index:
            return ("reordered", located.where, seq,
                    f"seq {seq} comes where seq {expected_seq} was expected; seq {expected_seq} appears later: "
                    "entries were moved")
        missing = f"seq {expected_seq}" if seq == expected_seq + 1 else f"seqs {expected_seq}..{seq - 1}"
        return ("deleted", located.where, seq, f"{missing} missing before this entry: entries were deleted")
    if seq < expected_seq:
        return ("reordered", located.where, seq, f"seq {seq} comes after seq {expected_seq - 1}: entries were moved")
    if previous is not None and previous.seq == seq - 1:
        # The successor still links to what seq-1 used to be: that entry was rewritten (and re-hashed).
        return ("replaced", previous.where, previous.seq,
                f"its hash is not the one the next entry ({located.where}) links to: it was replaced")
    return ("inserted", located.where, seq,
            "its prev is not the hash of the entry before it: an entry was inserted or replaced here")


def _check_file_ends(files: dict[str, dict], result: VerifyResult) -> None:
    names = list(files)
    for position, name in enumerate(names):
        info = files[name]
        last: Located | None = info["last"]
        partial: bytes = info["partial"]
        is_newest = position == len(names) - 1
        acknowledged = _acknowledgement(files, names, position, result)
        if partial and not acknowledged:
            after = f"after seq {last.seq}" if last else "before its first entry"
            severity = INCOMPLETE if is_newest else FAILED
            result.add(severity, "truncated", f"{name}:{info['lines'] + 1}", last.seq + 1 if last else None,
                       f"the file ends with a partial line of {len(partial)} bytes {after}: it was cut while being "
                       "written (a crash) or truncated")
        elif not is_newest and not acknowledged and last is not None and last.entry.get("kind") != "checkpoint":
            result.add(FAILED, "truncated", last.where, last.seq,
                       "the file ends without its closing checkpoint: entries were removed from its end")


def _acknowledgement(files: dict[str, dict], names: list[str], position: int, result: VerifyResult) -> bool:
    """True when a later run's first entry describes exactly how this file was cut (a crash it recovered from)."""
    name, info = names[position], files[names[position]]
    for later in names[position + 1:]:
        first: Located | None = files[later]["first"]
        if first is None:
            continue
        note = first.entry.get("recovered")
        if not isinstance(note, dict) or note.get("file") != name:
            return False
        partial = info["partial"]
        digest = hashlib.sha256(partial).hexdigest() if partial else None
        if (note.get("valid_size") != info["valid_size"] or note.get("partial_bytes") != len(partial)
                or note.get("partial_sha256") not in (None, digest)):
            result.add(FAILED, "modified", name, first.seq,
                       f"the file no longer ends as the restart at {first.where} recorded "
                       f"({_shown(note.get('valid_size'))} + {_shown(note.get('partial_bytes'))} bytes): it was "
                       "changed since")
        return True
    return False


def _check_signatures(result: VerifyResult, anchors: list[Ed25519PublicKey]) -> None:
    declared: dict[str, Ed25519PublicKey] = {}
    valid: list[tuple[int, str]] = []  # (seq, key id) of checkpoints with a good signature
    rotations: list[tuple[int, str, str]] = []  # (seq, old key id, new key id)
    retired: dict[str, int] = {}  # key id -> seq from which it must no longer sign
    for located in result.log:
        entry, seq = located.entry, located.seq
        kind = entry.get("kind")
        for record in (entry.get("signing_key"), entry.get("new_key")):
            if isinstance(record, dict):
                try:
                    key = public_key_from_record(record)
                    declared.setdefault(key_id(key), key)
                except (ValueError, KeyError, TypeError) as e:
                    result.add(FAILED, "bad key", located.where, seq, f"the public key it declares is invalid: {e}")
        if kind == "key_rotation" and isinstance(entry.get("new_key"), dict):
            new_id, old_id = entry["new_key"].get("key_id"), entry.get("old_key_id")
            new_key = declared.get(new_id)
            if new_key is None or not verify_signature(new_key, str(entry.get("new_key_proof")),
                                                       rotation_message(str(old_id), str(new_id))):
                result.add(FAILED, "forged", located.where, seq, "the new key's proof of possession does not verify")
            else:
                rotations.append((seq, old_id, new_id))
                retired[old_id] = seq + 2  # the old key signs the rotation's own checkpoint, then never again
        if kind != "checkpoint":
            continue
        result.checkpoints += 1
        signer = entry.get("key_id")
        key = declared.get(signer)
        if entry.get("signed_seq") != seq - 1 or entry.get("signed_hash") != entry.get("prev"):
            result.add(FAILED, "forged", located.where, seq, "the checkpoint does not sign the entry before it")
        elif key is None:
            result.add(FAILED, "forged", located.where, seq,
                       f"signed with key {_shown(signer, 'not named')[:16]}, which no entry declares")
        elif not verify_signature(key, str(entry.get("signature")),
                                  checkpoint_message(entry["signed_seq"], entry["signed_hash"])):
            result.add(FAILED, "forged", located.where, seq, "the checkpoint's signature does not verify: forged or altered")
        elif signer in retired and seq >= retired[signer]:
            result.add(FAILED, "forged", located.where, seq, f"signed with key {signer[:16]}, retired at seq {retired[signer] - 2}")
        else:
            valid.append((seq, signer))
    result.keys_seen = list(declared)

    trusted = {key_id(k) for k in anchors}
    if not anchors and declared:
        first = next(iter(declared))
        trusted, result.anchor_source = {first}, "no key given: the first key the log itself declares (no independent anchor)"
    changed = True
    while changed:  # a rotation authenticated by a trusted key hands trust on to the new key
        changed = False
        for seq, old_id, new_id in rotations:
            if old_id in trusted and new_id not in trusted and any(s > seq and k in trusted for s, k in valid):
                trusted.add(new_id)
                changed = True
    result.anchors = sorted(trusted)
    covered = [s for s, k in valid if k in trusted]
    result.signed_upto = max(covered, default=0)
    for seq, signer in valid:
        if seq > result.signed_upto:
            where = next(l.where for l in result.log if l.seq == seq)
            result.add(FAILED, "untrusted key", where, seq,
                       f"signed with key {signer[:16]}, which is neither trusted nor handed over by a key rotation "
                       "signed with a trusted key (was the signing key replaced?)")
    tail = [l for l in result.log if isinstance(l.seq, int) and l.seq > result.signed_upto]
    if tail:
        result.add(INCOMPLETE, "unsigned", tail[0].where, tail[0].seq,
                   f"{len(tail)} entries from here on are chained but not covered by a trusted signature "
                   "(the gateway is running, or stopped without a clean shutdown)")


def _crash_window(result: VerifyResult) -> set[int]:
    """Seqs of a run that did not shut down cleanly whose flow records a crash may have lost: those written after
    its last checkpoint, and those from the flow entry that checkpoint names as the first whose record was still
    on its way to its file (``records_pending_from``: flow records are written a moment after their entries)."""
    window: set[int] = set()
    run: list[Located] = []

    def close_run(clean: bool) -> None:
        if not clean:
            checkpoints = [l for l in run if l.entry.get("kind") == "checkpoint" and isinstance(l.seq, int)]
            last = max(checkpoints, key=lambda l: l.seq, default=None)
            last_cp = last.seq if last is not None else 0
            pending = last.entry.get("records_pending_from") if last is not None else None
            if type(pending) is int and 0 < pending < last_cp:
                last_cp = pending - 1
            window.update(l.seq for l in run if isinstance(l.seq, int) and l.seq > last_cp)

    for located in result.log:
        if located.entry.get("kind") == "gateway_start" and run:
            close_run(run[-1].entry.get("kind") == "checkpoint" and run[-1].entry.get("reason") == "shutdown")
            run = []
        run.append(located)
    if run:
        close_run(run[-1].entry.get("kind") == "checkpoint" and run[-1].entry.get("reason") == "shutdown")
    return window


def _check_flows(records_dir: Path, result: VerifyResult) -> None:
    flow_files: dict[str, FlowFile] = read_flow_files(records_dir)
    result.flow_files = len(flow_files)
    crash_window = _crash_window(result)
    unconsumed: dict[tuple[str, str], list] = {}
    for flow_file in flow_files.values():
        if flow_file.error == "not a regular file":
            result.add(INCOMPLETE, "not a flow file", flow_file.name, None,
                       "it is not a regular file (a device, a FIFO or a link to one): not read")
        if flow_file.cut_at is not None:
            result.add(INCOMPLETE, "truncated flow file", flow_file.name, None,
                       f"ends with an unreadable record at byte {flow_file.cut_at} (cut by a crash, or damaged)")
        if flow_file.too_deep:
            offsets = ", ".join(map(str, flow_file.too_deep[:5])) + (" ..." if len(flow_file.too_deep) > 5 else "")
            result.add(INCOMPLETE, "nested too deep", flow_file.name, None,
                       f"{len(flow_file.too_deep)} part(s) of its records nest deeper than {MAX_DEPTH} levels and "
                       f"were not read (at byte {offsets}); the gateway writes nothing that deep")
        for record in flow_file.records:
            unconsumed.setdefault((record.file, record.flow_id), []).append(record)
    acknowledged: set[str] = set()
    withheld: set[str] = set()
    lost = _reported_losses(result)
    for located in result.log:
        acknowledged.update(str(i) for i in _list(located.entry.get("unaudited_flows")))
        withheld.update(str(i) for i in _list(located.entry.get("withheld_flows")))
    record_entries = _record_entries(result)
    for located in result.log:
        entry = located.entry
        if entry.get("kind") != "flow":
            continue
        result.flow_entries += 1
        name, flow_id = entry.get("flow_file"), entry.get("flow_id")
        name = name if isinstance(name, str) else None  # an entry edited to hold anything else fails below
        flow_id = flow_id if isinstance(flow_id, str) else repr(flow_id)  # the key records are matched by
        shown_id, shown_file = _shown(entry.get("flow_id"), "(no flow id)"), name or "its flow file (none named)"
        candidates = unconsumed.get((name, flow_id), [])
        wanted = (entry.get("request_sha256"), entry.get("response_sha256"))
        version = entry.get("v", 1)
        # The whole-flow digest: format 2's in the flow entry itself, format 3's in the flow's record entry.
        holder = entry if version == 2 else record_entries.get(located.seq, {}) if version == 3 else {}
        audited = holder.get("record") if isinstance(holder.get("record"), dict) else None
        if entry.get("stream_cut"):
            result.streams_cut += 1
        if audited is not None:  # formats 2 and 3: the whole record, field by field
            match = next((r for r in candidates if r.record and r.record["sha256"] == audited.get("sha256")), None)
        elif version != 1:
            match = None  # no record digest for this flow entry: see below
        else:  # format 1: the two body digests
            match = next((r for r in candidates if (r.request_sha256, r.response_sha256) == wanted), None)
        # Format 2 took its digest in the hook, format 3 as the record is taken (the same step): only format 2
        # can have a record with an error mitmproxy noted later.
        late_error = _late_error(audited, candidates) if version == 2 and audited and match is None else None
        if match is not None:
            candidates.remove(match)
            result.flows_matched += 1
        elif late_error is not None and flow_id not in withheld:
            candidates.remove(late_error)
            result.flows_matched += 1
            result.add(NOTE, "error after the entry", located.where, located.seq,
                       f"flow {shown_id} in {shown_file}: mitmproxy noted an error on it after its entry was written (the "
                       "client left while the reply was being sent); every other field matches")
        elif candidates and flow_id in withheld and (version != 3 or audited is None):
            candidates.pop(0)
            result.add(NOTE, "reply withheld", located.where, located.seq,
                       f"flow {shown_id}: its reply was withheld (its entry could not be made durable); the record "
                       "holds what the caller got instead")
        elif candidates and audited is not None:
            nearest = min(candidates, key=lambda r: len(differing_fields(audited, r.record or {})))
            candidates.remove(nearest)  # this entry's record, changed: not also "a record without entry"
            fields = differing_fields(audited, nearest.record or {})
            named = ", ".join(fields) if fields else "the record (its field digests in the entry were edited)"
            verb = "differs" if len(fields) <= 1 else "differ"
            result.add(FAILED, "flow modified", located.where, located.seq,
                       f"flow {shown_id} in {shown_file}: {named} {verb} from its audit entry")
        elif candidates and version == 3 and (flow_id in acknowledged or located.seq in crash_window):
            # Not digested, but the flow entry still holds the bodies' digests: those are checked (format 1's way).
            bodies = next((r for r in candidates if (r.request_sha256, r.response_sha256) == wanted), None)
            if bodies is None:
                record = candidates.pop(0)
                which = "request" if record.request_sha256 != wanted[0] else "response"
                result.add(FAILED, "flow modified", located.where, located.seq,
                           f"flow {shown_id} in {shown_file}: the recorded {which} body does not match the audited "
                           "digest")
            else:
                candidates.remove(bodies)
                why = ("the audit log failed before it could write the digest of its record (the log says so)"
                       if flow_id in acknowledged else
                       "the gateway stopped (a crash) before the digest of its record reached the log")
                result.add(INCOMPLETE, "record not digested", located.where, located.seq,
                           f"flow {shown_id} in {shown_file}: {why}; its bodies match their digests, the rest of its "
                           "record cannot be checked field by field")
        elif candidates:
            record = candidates[0]
            if version == 3:
                candidates.pop(0)  # this entry's record, not also "a record without entry"
                message = "its record entry, the digest of what the record holds, is missing"
            elif version != 1:
                message = "its audit entry has no record digest to check it against"
            else:
                which = "request" if record.request_sha256 != wanted[0] else "response"
                message = f"the recorded {which} body does not match the audited digest"
            result.add(FAILED, "flow modified", located.where, located.seq, f"flow {shown_id} in {shown_file}: {message}")
        elif flow_id in lost:
            report, reason = lost[flow_id]
            result.flows_lost_reported += 1
            refused = entry.get("refusal") if isinstance(entry.get("refusal"), dict) else None
            if refused:
                result.add(NOTE, "record lost (reported)", located.where, located.seq,
                           f"flow {shown_id} was refused ({_shown(refused.get('code'))}) and its record never reached "
                           f"{shown_file}; the gateway reported the loss at {report}: {reason}")
            else:
                result.add(INCOMPLETE, "record lost (reported)", located.where, located.seq,
                           f"flow {shown_id} was served but its record never reached {shown_file}; the gateway reported "
                           f"the loss itself at {report} ({reason}): not tampering, but its bodies cannot be checked")
        elif name is None:
            result.add(FAILED, "flow missing", located.where, located.seq, f"flow {shown_id} names no flow file")
        elif located.seq in crash_window:
            result.add(INCOMPLETE, "flow lost in crash", located.where, located.seq,
                       f"flow {shown_id} is not in {shown_file}: the gateway is still running, or "
                       "stopped (a crash) before writing it")
        else:
            missing = "is missing" if name not in flow_files else f"has no flow {shown_id}"
            result.add(FAILED, "flow missing", located.where, located.seq,
                       f"flow file {name} {missing}: the flow record was removed or replaced")
    for records in unconsumed.values():
        for record in records:
            where = f"{record.file}@{record.offset}"
            record_id = record.flow_id if record.flow_id != "None" else "(no flow id)"  # a record without its id
            if record.refusal_code in REFUSED_UNAVAILABLE:
                result.refused_unaudited_ids.add(record.flow_id)
                result.add(NOTE, "refused unaudited", where, None,
                           f"flow {record_id} was refused with 503 ({record.refusal_code}) while the gateway "
                           "could not audit or record it")
            elif record.flow_id in acknowledged:
                result.add(INCOMPLETE, "known gap", where, None,
                           f"flow {record_id} was served while the audit log failed; the log says so")
            else:
                result.add(FAILED, "unaudited flow", where, None,
                           f"flow {record_id} has no audit entry: its entry was removed")


def _record_entries(result: VerifyResult) -> dict[int, dict]:
    """Format 3: the seq of a flow entry → its record entry. A record entry must name a flow entry of its own
    flow written before it, and no flow entry has two: anything else is a failure (`bad record reference`),
    which only a gateway bug or the signing key could write."""
    flows: dict[int, dict] = {}
    found: dict[int, dict] = {}
    for located in result.log:
        entry = located.entry
        if entry.get("kind") == "flow" and isinstance(located.seq, int):
            flows[located.seq] = entry
        elif entry.get("kind") == RECORD_EVENT and located.seq is not None:
            reference = entry.get("flow")
            flow = flows.get(reference) if type(reference) is int else None
            if flow is None or flow.get("flow_id") != entry.get("flow_id") or reference in found:
                if type(reference) is not int or result.first_seq is None or result.first_seq <= reference:
                    result.add(FAILED, "bad record reference", located.where, located.seq,
                               f"the record entry of flow {_shown(entry.get('flow_id'), '(no flow id)')} names seq "
                               f"{_shown(reference)}, which is not an earlier flow entry of that flow without a "
                               "record entry")
                continue
            found[reference] = entry
    return found


def _late_error(audited: dict, candidates: list[FlowRecord]) -> FlowRecord | None:
    """Format 2: the record that differs from its entry only by an error the entry did not have.

    mitmproxy notes a client that left while a response hook ran as the flow's error after the hook
    (check_killed), without an error hook: the flow recorder, which takes the state a moment later, keeps
    it; a format 2 entry, written in the hook, could not. Any other difference is tampering. (A format 3
    record entry is written as the record is taken: it has what the record has.)"""
    fields = audited.get("fields") if isinstance(audited.get("fields"), dict) else {}
    if ERROR_FIELD in fields:
        return None
    return next((r for r in candidates if r.record and differing_fields(audited, r.record) == [ERROR_FIELD]), None)


def _check_intents(result: VerifyResult) -> None:
    """Every intent (a request about to go upstream) has an outcome entry naming it, or is reported: forwarded,
    outcome unknown (the gateway stopped, by a crash or a kill, before the reply). Not tampering: the chain
    and the signatures vouch for what is there."""
    intents: dict[int, Located] = {}
    answered: set[int] = set()
    for located in result.log:
        entry = located.entry
        if entry.get("kind") == INTENT_EVENT and isinstance(located.seq, int):
            intents[located.seq] = located
        elif entry.get("kind") == "flow" and isinstance(entry.get("intent"), int):
            reference = entry["intent"]
            intent = intents.get(reference)
            if intent is None or intent.entry.get("flow_id") != entry.get("flow_id"):
                if result.first_seq is not None and result.first_seq <= reference:
                    result.add(FAILED, "bad intent reference", located.where, located.seq,
                               f"flow {_shown(entry.get('flow_id'), '(no flow id)')} names seq {reference} as its "
                               "intent, which is not the intent entry of that flow")
                continue
            answered.add(reference)
    result.intents = len(intents)
    for seq, located in intents.items():
        if seq in answered:
            continue
        entry = located.entry
        if entry.get("flow_id") in result.refused_unaudited_ids:
            # Forwarded, then the log could not take the outcome entry: the reply was withheld (503) and the
            # flow file holds the refusal. The outcome is known; only its entry is missing, as the gateway said.
            result.replies_withheld += 1
            result.add(NOTE, "reply withheld", located.where, seq,
                       f"flow {_shown(entry.get('flow_id'), '(no flow id)')} ({_request_line(entry)}): forwarded, "
                       "then its reply was withheld (503) because the audit log could not take its outcome entry; "
                       "the flow file holds the refusal")
            continue
        result.outcome_unknown += 1
        result.add(INCOMPLETE, OUTCOME_UNKNOWN, located.where, seq,
                   f"flow {_shown(entry.get('flow_id'), '(no flow id)')} ({_request_line(entry)}): "
                   "forwarded, outcome unknown (gateway stopped): its intent has no outcome entry")


def _request_line(entry: dict) -> str:
    """"POST api.openai.com/v1/responses" from an intent entry, leaving out what it does not say."""
    method, host, path = (entry.get(k) if isinstance(entry.get(k), (str, int)) and entry.get(k) != "" else None
                          for k in ("method", "host", "path"))
    target = f"{host or ''}{path or ''}" if host or path else None
    line = " ".join(str(part) for part in (method, target) if part is not None)
    return line or "request not recorded"


def _shown(value, missing: str = "not recorded") -> str:
    """A value in a finding an auditor reads: never "None", never a raw dict or list."""
    if value is None or value == "":
        return missing
    if isinstance(value, (dict, list, tuple)):
        return f"({type(value).__name__} in place of a value)"
    return str(value)


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _reported_losses(result: VerifyResult) -> dict[str, tuple[str, str]]:
    """flow id → (where the gateway reported its record lost, why), from its records_lost entries.

    Only entries that are part of the chain count: an inserted or edited report fails the chain and
    signature checks like any other entry."""
    lost: dict[str, tuple[str, str]] = {}
    for located in result.log:
        if located.entry.get("kind") != RECORDS_LOST_EVENT:
            continue
        for item in _list(located.entry.get("flows")):
            if isinstance(item, dict) and item.get("flow_id") is not None:
                lost.setdefault(str(item["flow_id"]), (located.where, _shown(located.entry.get("reason"),
                                                                              "no reason given")))
    return lost


def verify(records_dir: Path, pubkeys: list[Path] | None = None, check_flows: bool = True) -> VerifyResult:
    records_dir = Path(records_dir)
    result = VerifyResult(records_dir=str(records_dir))
    audit_dir = records_dir / AUDIT_SUBDIR
    anchors: list[Ed25519PublicKey] = []
    if pubkeys:
        anchors = [load_public_key_pem(p) for p in pubkeys]
        result.anchor_source = "given with --pubkey"
    elif (audit_dir / PUBLIC_KEY_FILE).exists():
        anchors = [load_public_key_pem(audit_dir / PUBLIC_KEY_FILE)]
        result.anchor_source = (f"{AUDIT_SUBDIR}/{PUBLIC_KEY_FILE} from the records themselves; pass --pubkey with a "
                                "copy obtained independently to rule out a replaced log")
    files = _read_log(audit_dir, result)
    entries = [l for l in result.log if isinstance(l.seq, int)]
    result.entries = len(entries)
    if not entries:
        result.add(FAILED, "empty", str(audit_dir), None, "no audit entries found")
    else:
        result.first_seq, result.last_seq = entries[0].seq, entries[-1].seq
        _check_chain(result)
        _check_file_ends(files, result)
        _check_signatures(result, anchors)
        if check_flows:
            _check_flows(records_dir, result)
        _check_intents(result)  # after the flow files: a reply withheld for the log is known from its record
    if any(f.severity == FAILED for f in result.findings):
        result.status = FAILED
    elif any(f.severity == INCOMPLETE for f in result.findings):
        result.status = INCOMPLETE
    return result
