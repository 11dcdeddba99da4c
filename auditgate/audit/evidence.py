"""The ISO/IEC 27001 evidence pack: figures per Annex A control from verified audit logs (one or several
instances), each traceable to audit sequence numbers, as Markdown, HTML tables and JSON.

Plain Python plus `cryptography` (through the verifier); no mitmproxy, no network, no external assets.
"""

from __future__ import annotations

import html
import json
import shlex
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from auditgate.approval.rules import normalized_name
from auditgate.audit.chain import AUDIT_SUBDIR, PUBLIC_KEY_FILE
from auditgate.audit.verify import Located, VerifyResult, verify
from auditgate.core.private_files import private_dir, write_private_atomically

SAMPLE_LIMIT = 5

CONTROLS = [
    ("A.5.15", "Access control", ["A.9.1.1", "A.9.1.2"]),
    ("A.5.18", "Access rights", ["A.9.2.2", "A.9.2.5", "A.9.2.6"]),
    ("A.5.3", "Segregation of duties", ["A.6.1.2"]),
    ("A.8.15", "Logging", ["A.12.4.1", "A.12.4.2", "A.12.4.3"]),
    ("A.8.16", "Monitoring activities", ["A.12.4.1 (in part: a control new in 2022)"]),
    ("A.8.11", "Data masking", ["A.18.1.4 (in part: a control new in 2022)"]),
    ("A.5.33", "Protection of records", ["A.18.1.3"]),
]

CANNOT_SHOW = [
    "That no AI traffic bypassed the gateway: calls made directly to a provider, with a key the gateway does not "
    "hold, leave no trace here. Network egress controls have to show that.",
    "Who the person behind a service token is: an identity is the name the token was issued to.",
    "That the log is complete after the last checkpoint a witness holds: entries after it are only hash-chained, "
    "and without a witness (`--witness`) the end of a log can be cut off, its newest file deleted or an older copy "
    "restored without a trace in the chain (the flow-file cross-check catches it only while the flow files are "
    "intact).",
    "That the signing key was not stolen from the gateway host: whoever holds the private key can sign a rewritten "
    "log. The key is kept outside the records; its custody is the operator's.",
    "That the gateway's clock was right: entry times are the gateway host's UTC clock.",
    "That masking found every piece of personal data: it counts what its recognisers matched, by type.",
    "The content of pass-through tunnels, which the gateway neither decrypts nor records.",
    "Whether a rules change was authorised: the log shows the digest of every rules file in force and when it "
    "changed, not who changed it.",
]


NO_SELF_CHECK = ("These records hold no format 2 or later checkpoint to show the commands on; see the auditors' guide "
                 "for recomputing an entry's hash and checking a signature without auditgate.")


class EvidenceError(ValueError):
    pass


def _day(text: str | None, end: bool) -> str | None:
    if not text:
        return None
    try:
        parsed = date.fromisoformat(text[:10])
    except ValueError:
        raise EvidenceError(f"not a date (YYYY-MM-DD): {text!r}") from None
    return parsed.isoformat() + ("T23:59:59.999999Z" if end else "T00:00:00.000000Z")


def _name(identity) -> str:
    if not isinstance(identity, dict):
        return "(unauthenticated)"
    return _text(identity.get("name"), "(unnamed)")


def _text(value, empty: str = "—") -> str:
    """A value as an auditor reads it: never None, never a raw dict or list."""
    if value is None or value == "":
        return empty
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) or empty
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_text(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) or empty
    return str(value)


def _iso(value) -> str:
    """A time in ISO 8601 UTC to the second: from an entry's time, or from epoch seconds (also as a string)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            try:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                return value
            return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return "—"


def _outcome(entry: dict) -> str:
    if entry.get("refusal"):
        return "refused"
    status = entry.get("status")
    if entry.get("error") or not isinstance(status, int) or status >= 500:
        return "failed"
    return "served"


def instance_name(result: VerifyResult) -> str:
    """Which instance wrote a records directory: its entries' `instance` field, else the directory's name."""
    named = Counter(l.entry["instance"] for l in result.log if isinstance(l.entry.get("instance"), str) and l.entry["instance"])
    if named:
        return named.most_common(1)[0][0]
    return Path(result.records_dir).absolute().name


@dataclass(frozen=True)
class _Entry:
    instance: str
    located: Located

    @property
    def entry(self) -> dict:
        return self.located.entry

    @property
    def ref(self) -> str:
        """Where an auditor finds it: the instance and the audit sequence number."""
        return f"{self.instance}#{self.located.seq}"


def _refs(items) -> list[str]:
    return [item.ref for item in items]


def refs_text(refs: list[str], several: bool, limit: int = 12) -> str:
    """Sequence numbers as ranges, per instance: "seq 3, 7–9" or "gw-a: 3, 7–9; gw-b: 2"."""
    per_instance: dict[str, list[int]] = {}
    for ref in refs:
        instance, _, seq = ref.rpartition("#")
        per_instance.setdefault(instance, []).append(int(seq))
    parts, shown, total = [], 0, 0
    for instance, seqs in per_instance.items():
        ranges: list[str] = []
        for seq in sorted(set(seqs)):
            if ranges and ranges[-1][1] == seq - 1:
                ranges[-1] = (ranges[-1][0], seq)
            else:
                ranges.append((seq, seq))
        total += len(ranges)
        take = ranges[:max(0, limit - shown)]
        shown += len(take)
        if take:
            text = ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in take)
            parts.append(f"{instance}: {text}" if several else f"seq {text}")
    more = f" … and {total - shown} more range(s) (all in evidence.json)" if total > shown else ""
    return ("; ".join(parts) or "—") + more


def _grouped(items: list[_Entry], key) -> dict:
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _who_called_what(flows: list[_Entry]) -> list[dict]:
    def key(item: _Entry):
        e = item.entry
        endpoint = f"{_text(e.get('method'), '')} {_text(e.get('path'), '')}".strip() or "—"
        return (_name(e.get("identity")), item.instance, endpoint, _text(e.get("model"), "(none)"))

    rows = []
    for (caller, instance, endpoint, model), items in sorted(_grouped(flows, key).items()):
        outcomes = Counter(_outcome(i.entry) for i in items)
        rows.append({"caller": caller, "instance": instance, "endpoint": endpoint, "model": model,
                     "requests": len(items), "served": outcomes["served"], "refused": outcomes["refused"],
                     "failed": outcomes["failed"], "entries": _refs(items)})
    return rows


def _decisions_by_rule(flows: list[_Entry]) -> list[dict]:
    def key(item: _Entry):
        decision = item.entry.get("policy")
        if not isinstance(decision, dict):
            return ("(no policy decision)", "—")
        action = decision.get("action") or decision.get("decision") or decision.get("outcome")
        return (_text(decision.get("rule"), "(unnamed rule)"), _text(action, "(recorded)"))

    return [{"rule": rule, "action": action, "requests": len(items), "entries": _refs(items)}
            for (rule, action), items in sorted(_grouped(flows, key).items())]


def _details(entry: dict) -> dict:
    details = entry.get("details")
    return details if isinstance(details, dict) else {}


def _approvals(events: list[_Entry]) -> tuple[list[dict], list[dict]]:
    """One row per approval (requested → decided), and the refused attempts to decide, who tried and why."""
    rows: dict[str, dict] = {}
    attempts = []
    for item in events:
        e, details = item.entry, _details(item.entry)
        approval_id = _text(details.get("approval_id") or e.get("flow_id"), "(unknown)")
        decision = _text(e.get("decision"), "(unknown)")
        if decision.startswith("refused_"):
            attempts.append({"time": _iso(e.get("time")), "who": _text(e.get("approver"), "(unknown)"),
                             "attempted": {"refused_approved": "approve", "refused_denied": "deny"}.get(decision, decision),
                             "requester": _text(e.get("requester"), "(unknown)"), "approval_id": approval_id,
                             "instance": item.instance, "code": _text(details.get("code")),
                             "why": _text(e.get("reason")), "entry": item.ref})
            continue
        row = rows.setdefault(approval_id, {
            "approval_id": approval_id, "rule": "—", "requester": "(unknown)", "requested_at": "—",
            "requested_on": "—", "decision": "pending", "approver": "—", "decided_at": "—", "decided_on": "—",
            "reason": "—", "entries": []})
        row["entries"].append(item.ref)
        row["rule"] = _text(details.get("rule"), row["rule"])
        row["requester"] = _text(e.get("requester"), row["requester"])
        if decision == "requested":
            row["requested_at"], row["requested_on"] = _iso(e.get("time")), item.instance
        else:
            row.update(decision=decision, approver=_text(e.get("approver"), "(the gateway)" if decision == "expired" else "—"),
                       decided_at=_iso(e.get("time")), decided_on=item.instance, reason=_text(e.get("reason")))
    return list(rows.values()), attempts


def _config_changes(configs: list[_Entry], earlier: dict[str, _Entry]) -> list[dict]:
    """Per rules file: when it changed, its old and new digest, and which rule ids were added, removed or changed
    where the entries record a digest per rule (`rule_digests`, policy.yaml since format 2's config entries).

    `earlier` holds each instance's configuration entry before the period (what the first change is from)."""
    rows = []
    previous = dict(earlier)
    for item in configs:
        files = _mapping(item.entry.get("files"))
        before_item = previous.get(item.instance)
        before = _mapping(before_item.entry.get("files")) if before_item else {}
        for name in sorted(set(files) | set(before)):
            old, new = before.get(name), files.get(name)
            if old == new and before_item is not None:
                continue
            rules = _rule_changes(before_item.entry if before_item else None, item.entry, name)
            rows.append({"instance": item.instance, "time": _iso(item.entry.get("time")), "file": str(name),
                         "old": _short(old) if before_item is not None else "(first record)",
                         "new": _short(new) if new else "(removed)",
                         "reason": _text(item.entry.get("reason")), **rules, "entry": item.ref})
        previous[item.instance] = item
    return rows


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _short(digest) -> str:
    return f"sha256:{digest[:16]}…" if isinstance(digest, str) and digest else "(none)"


def _rule_changes(before: dict | None, after: dict, name: str) -> dict:
    """The rule ids (and top-level settings) of one file that an edit added, removed or changed, from the per-rule
    digests of the config entries before and after it; `rules_changed` says it in words for the tables."""
    now = _mapping(_mapping(after.get("rule_digests")).get(name))
    unparsed = _mapping(after.get("rules_unparsed")).get(name)
    had_rules = before is not None and name in _mapping(before.get("rule_digests"))
    if unparsed is not None:
        return {"rules_changed": f"not readable as rules ({_text(unparsed)}); the gateway keeps the rules it had"}
    if name not in _mapping(after.get("files")):
        gone = sorted(map(str, _mapping(_mapping(before.get("rule_digests")).get(name)))) if had_rules else []
        return {"rules_changed": f"file removed (its rules: {', '.join(gone)})" if gone else "file removed",
                "rules_removed": gone}
    if not now and not had_rules:
        recorded = "rule_digests" in after or (before is not None and "rule_digests" in before)
        is_rule_list = name in _RULE_LIST_FILES
        return {"rules_changed": "not recorded" if is_rule_list and not recorded else "—"}
    if before is None:
        return {"rules_changed": f"first record: {len(now)} rule(s)", "rules_added": sorted(map(str, now))}
    then = _mapping(_mapping(before.get("rule_digests")).get(name))
    if not had_rules:  # the entry before did not record its rules (an older gateway, or the file did not parse)
        return {"rules_changed": f"{len(now)} rule(s) now; the rules before were not recorded"}
    added = sorted(str(r) for r in set(now) - set(then))
    removed = sorted(str(r) for r in set(then) - set(now))
    changed = sorted(str(r) for r in set(now) & set(then) if now[r] != then[r])
    settings_now = _mapping(_mapping(after.get("setting_digests")).get(name))
    settings_then = _mapping(_mapping(before.get("setting_digests")).get(name))
    settings = sorted(str(k) for k in set(settings_now) | set(settings_then) if settings_now.get(k) != settings_then.get(k))
    parts = [f"{label}: {', '.join(ids)}" for label, ids in
             (("added", added), ("removed", removed), ("changed", changed), ("settings changed", settings)) if ids]
    order_now = _mapping(after.get("rule_order")).get(name)
    order_then = _mapping(before.get("rule_order")).get(name)
    reordered = (isinstance(order_now, list) and isinstance(order_then, list)  # the rules in both, in another order
                 and [r for r in order_now if r in then] != [r for r in order_then if r in now])
    if reordered:
        parts.append("order of the rules changed")  # first match wins: a reordering changes decisions
    return {"rules_changed": "; ".join(parts) or "none (layout or comments only)", "rules_added": added,
            "rules_removed": removed, "rules_modified": changed, "settings_changed": settings,
            "order_changed": reordered}


_RULE_LIST_FILES = ("policy.yaml",)  # auditgate.audit.entries.RULE_LIST_FILES (not imported: entries needs the core)


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _websocket(sessions: list[_Entry], events: list[_Entry], responses: list[_Entry]) -> dict:
    masked_responses = [i for i in responses if isinstance(i.entry.get("masking"), dict)
                        and (i.entry["masking"].get("findings") or i.entry["masking"].get("status") == "masked")]
    blocked_events = [i for i in events if i.entry.get("blocked") is True]
    return {
        "sessions": len(sessions),
        "messages_from_client": sum(_int(i.entry.get("messages_from_client")) for i in sessions),
        "messages_from_server": sum(_int(i.entry.get("messages_from_server")) for i in sessions),
        "blocked": sum(_int(i.entry.get("blocked")) for i in sessions),
        "masked": sum(_int(i.entry.get("masked")) for i in sessions),
        "events_decided": len(events),
        "events_blocked": len(blocked_events),
        "responses": len(responses),
        "responses_masked": len(masked_responses),
        "entries": {"sessions": _refs(sessions), "events": _refs(events), "events_blocked": _refs(blocked_events),
                    "responses": _refs(responses), "responses_masked": _refs(masked_responses)},
    }


def _outcome_unknown(entries: list[_Entry], everything: list[_Entry]) -> list[dict]:
    """Intent entries (a request about to go upstream) that no flow entry names as its intent (as the verifier
    decides it): forwarded, outcome unknown."""
    answered = {(i.instance, i.entry["intent"]) for i in everything  # an outcome after the period answers too
                if i.entry.get("kind") == "flow" and isinstance(i.entry.get("intent"), int)}
    rows = []
    for item in entries:
        e = item.entry
        if e.get("kind") != "intent" or (item.instance, item.located.seq) in answered:
            continue
        request = f"{_text(e.get('method'), '')} {_text(e.get('host'), '')}{_text(e.get('path'), '')}".strip()
        rows.append({"instance": item.instance, "time": _iso(e.get("time")), "flow_id": _text(e.get("flow_id")),
                     "caller": _name(e.get("identity")), "request": request or "—", "entry": item.ref})
    return rows


def build_evidence(results: VerifyResult | list[VerifyResult], date_from: str | None = None,
                   date_to: str | None = None, tails: list[str] | None = None) -> dict:
    """Figures, tables and their audit sequence numbers from the verifiers' parsed logs (what is counted is what
    was verified); one pack over one or several instances' records."""
    results = [results] if isinstance(results, VerifyResult) else list(results)
    names = _unique_names(results)
    start, end = _day(date_from, False), _day(date_to, True)
    everything = [_Entry(name, l) for name, result in zip(names, results) for l in result.log
                  if isinstance(l.seq, int) and isinstance(l.entry.get("time"), str)]
    everything.sort(key=lambda i: i.entry["time"])
    in_period = [i for i in everything if (not start or i.entry["time"] >= start) and (not end or i.entry["time"] <= end)]
    of_kind = lambda kind: [i for i in in_period if i.entry.get("kind") == kind]  # noqa: E731
    flows = of_kind("flow")

    per_identity = Counter(_name(i.entry.get("identity")) for i in flows)
    groups: dict[str, set] = {}
    for i in flows:
        identity = i.entry.get("identity")
        if isinstance(identity, dict):
            groups.setdefault(_name(identity), set()).update(str(g) for g in identity.get("groups") or [])
    refusals = Counter(_text((i.entry.get("refusal") or {}).get("code"), "(unknown)")
                       for i in flows if isinstance(i.entry.get("refusal"), dict))
    outcomes = Counter(_outcome(i.entry) for i in flows)
    policy = Counter()
    for i in flows:
        decision = i.entry.get("policy")
        if isinstance(decision, dict):
            policy[_text(decision.get("decision") or decision.get("outcome") or decision.get("action"), "(recorded)")] += 1

    approval_events = of_kind("approval")
    decided = Counter(_text(i.entry.get("decision"), "(unknown)") for i in approval_events)
    approvals = [i for i in approval_events if i.entry.get("decision") == "approved" and i.entry.get("approver")]
    same = [i for i in approvals if _same_person(i.entry)]
    approval_rows, refused_attempts = _approvals(approval_events)

    masked_by_type, masked_by_direction, masked_flows = Counter(), Counter(), []
    for i in flows:
        masking = i.entry.get("masking")
        findings = masking.get("findings") if isinstance(masking, dict) else None
        if findings:
            masked_flows.append(i)
            for finding in findings:
                if isinstance(finding, dict):
                    count = finding.get("count") if isinstance(finding.get("count"), int) else 1
                    masked_by_type[_text(finding.get("entity_type"), "(unknown type)")] += count
                    masked_by_direction[_text(finding.get("direction"), "(unknown)")] += count

    configs_before = [i for i in everything if i.entry.get("kind") == "config" and (not end or i.entry["time"] <= end)]
    in_force: dict[str, _Entry] = {}
    for i in configs_before:
        in_force[i.instance] = i
    earlier: dict[str, _Entry] = {}
    for i in everything:
        if i.entry.get("kind") == "config" and start and i.entry["time"] < start:
            earlier[i.instance] = i
    checkpoints = of_kind("checkpoint")
    starts = of_kind("gateway_start")
    outages = of_kind("audit_resumed")
    witness_outages = of_kind("witness_unavailable")
    lost = of_kind("records_lost")

    figures = {
        "instances": names,
        "entries": len(in_period),
        "flows": len(flows),
        "callers": sorted(n for n in per_identity if n != "(unauthenticated)"),
        "requests_per_identity": dict(sorted(per_identity.items())),
        "groups_per_identity": {k: sorted(v) for k, v in sorted(groups.items())},
        "outcomes": dict(sorted(outcomes.items())),
        "refusals_by_reason": dict(sorted(refusals.items())),
        "status_codes": dict(sorted(Counter(_text(i.entry.get("status"), "no response") for i in flows).items())),
        "models": dict(sorted(Counter(_text(i.entry.get("model"), "(none)") for i in flows).items())),
        "policy_decisions": dict(sorted(policy.items())),
        "approval_events": len(approval_events),
        "approval_outcomes": dict(sorted(decided.items())),
        "approvals": len(approvals),
        "approvals_approver_differs": len(approvals) - len(same),
        "approvals_approver_is_requester": _refs(same),
        "approval_attempts_refused": len(refused_attempts),
        "flows_with_approval": len([i for i in flows if isinstance(i.entry.get("approval"), dict)]),
        "masked_entities_by_type": dict(sorted(masked_by_type.items())),
        "masked_entities_by_direction": dict(sorted(masked_by_direction.items())),
        "flows_with_masking": len(masked_flows),
        "config_in_force_per_instance": [
            {"instance": name, "entry": i.ref, "time": _iso(i.entry.get("time")),
             "files": {str(k): v for k, v in _mapping(i.entry.get("files")).items() if isinstance(v, str)}}
            for name, i in sorted(in_force.items())],
        "checkpoints": len(checkpoints),
        "signing_keys": sorted({_text(i.entry.get("key_id")) for i in checkpoints}),
        "key_rotations": _refs(of_kind("key_rotation")),
        "gateway_starts": len(starts),
        "restarts_after_crash": _refs([i for i in starts if i.entry.get("recovered")]),
        "audit_outages": [{"entry": i.ref, "since": _iso(i.entry.get("unavailable_since")),
                           "refused_requests": _int(i.entry.get("refused_requests"))} for i in outages],
        "witness_outages": _refs(witness_outages),
        # Flow records the gateway itself reported lost (a full disk, a writer that died): not removed later.
        "records_lost_reports": [{"entry": i.ref, "reason": _text(i.entry.get("reason")),
                                  "count": _int(i.entry.get("count"))} for i in lost],
    }
    tables = {
        "who_called_what": _who_called_what(flows),
        "decisions_by_rule": _decisions_by_rule(flows),
        "approvals": approval_rows,
        "refused_decision_attempts": refused_attempts,
        "config_changes": _config_changes(of_kind("config"), earlier),
        "masking": [{"entity_type": t, "count": c,
                     "entries": _refs([i for i in masked_flows if any(
                         isinstance(f, dict) and _text(f.get("entity_type"), "(unknown type)") == t
                         for f in i.entry["masking"]["findings"])])}
                    for t, c in sorted(masked_by_type.items())],
        "outcome_unknown": _outcome_unknown(in_period, everything),
    }
    # The first instance's configuration in force, as a single-instance pack always had it.
    figures["config_in_force"] = next((c for c in figures["config_in_force_per_instance"] if c["instance"] == names[0]),
                                      None) if names else None
    figures["websocket"] = _websocket(of_kind("websocket_session"), of_kind("websocket_event"),
                                      of_kind("websocket_response"))
    figures["forwarded_outcome_unknown"] = len(tables["outcome_unknown"])
    figures["entries_of"] = {
        "flows": _refs(flows), "refusals": _refs([i for i in flows if i.entry.get("refusal")]),
        "approvals": _refs(approvals), "refused_decision_attempts": [r["entry"] for r in refused_attempts],
        "masked": _refs(masked_flows), "checkpoints": _refs(checkpoints), "gateway_starts": _refs(starts),
        "config": _refs(of_kind("config")), "unauthenticated": _refs([i for i in flows if (i.entry.get("refusal") or {})
                                                                        .get("code") == "gateway_unauthenticated"]),
    }
    verification = _verification(names, results, tails or ["not checked (no witness)"] * len(results))
    period = {"from": _iso(in_period[0].entry["time"]) if in_period and not start else _iso(start),
              "to": _iso(in_period[-1].entry["time"]) if in_period and not end else _iso(end)}
    controls = _controls(figures, tables, verification, len(names) > 1)
    return {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "records_dirs": [r.records_dir for r in results], "records_dir": ", ".join(r.records_dir for r in results),
            "period": period, "controls": controls, "figures": figures, "tables": tables,
            "timeline": _timeline([i.entry for i in flows]), "verification": verification,
            "self_check": _self_check(names, results), "cannot_show": CANNOT_SHOW}


SELF_CHECK_TEXT = (
    "Nothing below needs auditgate. Each line of an audit file is one entry; its hash is the SHA-256 of the entry "
    "without its hash member, written as RFC 8785 (JCS) canonical JSON. A checkpoint signs, with Ed25519, the text "
    "auditgate-audit-checkpoint:v1:SEQ:HASH, where SEQ and HASH are the sequence number and hash of the entry "
    "before it. The first command recomputes the hash of one entry of these records with Python and the rfc8785 "
    "package (pip install rfc8785): it prints True and that hash, which is the HASH the second command checks the "
    "checkpoint's signature of with OpenSSL 3 (it prints \u201cSignature Verified Successfully\u201d). Use a copy of "
    "the public key obtained from the operator, not only the one in the records directory; auditgate verify "
    "--pubkey checks every entry the same way.")


def _self_check(names: list[str], results: list[VerifyResult]) -> dict | None:
    """The commands an auditor runs to recompute one entry's hash and check the signature over it with standard
    tools, filled in with the newest format 2 or later checkpoint of the first instance that has one, and the entry
    it signs."""
    for name, result in zip(names, results):
        by_seq = {l.seq: l for l in result.log if isinstance(l.seq, int)}
        checkpoint = next((l for l in reversed(result.log) if l.entry.get("kind") == "checkpoint"
                           and l.entry.get("v") is not None and isinstance(l.entry.get("signed_seq"), int)
                           and isinstance(l.entry.get("signed_hash"), str) and isinstance(l.entry.get("signature"), str)
                           and l.entry["signed_seq"] in by_seq and by_seq[l.entry["signed_seq"]].entry.get("v")), None)
        if checkpoint is None:
            continue
        entry = checkpoint.entry
        signed = by_seq[entry["signed_seq"]]
        audit_dir = Path(result.records_dir).absolute() / AUDIT_SUBDIR  # the commands run from anywhere
        hash_command = "\n".join([
            f"python3 - {shlex.quote(str(audit_dir / signed.file))} <<'PY'",
            "import hashlib, json, sys, rfc8785",
            f"entry = json.loads(open(sys.argv[1], 'rb').read().splitlines()[{signed.line - 1}])",
            "claimed = entry.pop('hash')",
            "digest = hashlib.sha256(rfc8785.dumps(entry)).hexdigest()",
            "print(digest == claimed, digest)",
            "PY"])
        message = f"auditgate-audit-checkpoint:v1:{entry['signed_seq']}:{entry['signed_hash']}"
        signature_command = "\n".join([
            f"printf '%s' {shlex.quote(message)} > msg.bin",
            f"printf '%s' {shlex.quote(entry['signature'])} | base64 -d > sig.bin",
            f"openssl pkeyutl -verify -pubin -inkey {shlex.quote(str(audit_dir / PUBLIC_KEY_FILE))} -rawin "
            "-in msg.bin -sigfile sig.bin"])
        return {"instance": name, "seq": signed.seq, "checkpoint_seq": checkpoint.seq, "text": SELF_CHECK_TEXT,
                "where": (f"{name}, seq {signed.seq} (line {signed.line} of {signed.file}), signed by the checkpoint "
                          f"at seq {checkpoint.seq}"),
                "commands": [hash_command, signature_command]}
    return None


def _unique_names(results: list[VerifyResult]) -> list[str]:
    names: list[str] = []
    for result in results:
        name = instance_name(result)
        if name in names:  # two directories of one instance name (copies): told apart by their directory
            name = f"{name} ({result.records_dir})"
        names.append(name)
    return names


def _verification(names: list[str], results: list[VerifyResult], tails: list[str]) -> dict:
    order = {"failed": 2, "incomplete": 1, "verified": 0}
    worst = max(results, key=lambda r: order.get(r.status, 2))
    per_instance = [{
        "instance": name, "records_dir": r.records_dir, "status": r.status, "exit_code": r.exit_code,
        "entries": r.entries, "first_seq": r.first_seq or 0, "last_seq": r.last_seq or 0,
        "signed_upto": r.signed_upto, "checkpoints": r.checkpoints, "trusted_keys": r.anchors,
        "trust_source": r.anchor_source or "—", "flow_entries": r.flow_entries, "flows_matched": r.flows_matched,
        "findings": [dict(f.__dict__, instance=name) for f in r.findings[:100]], "summary": r.summary(),
        "tail": tail,
    } for name, r, tail in zip(names, results, tails)]
    return {"status": worst.status, "exit_code": worst.exit_code, "instances": per_instance,
            "entries": sum(r.entries for r in results), "signed_upto": {n: r.signed_upto for n, r in zip(names, results)},
            "flow_entries": sum(r.flow_entries for r in results), "flows_matched": sum(r.flows_matched for r in results),
            "findings": [f for p in per_instance for f in p["findings"]],
            "summary": "\n".join(r.summary() for r in results)}


def _controls(f: dict, t: dict, v: dict, several: bool) -> list[dict]:
    refs = lambda key: refs_text(f["entries_of"][key], several)  # noqa: E731
    refused = sum(f["refusals_by_reason"].values())
    unauth = f["refusals_by_reason"].get("gateway_unauthenticated", 0)
    ws = f["websocket"]
    signed = ", ".join(f"{name}: seq {seq}" for name, seq in v["signed_upto"].items())
    evidence = {
        "A.5.15": [f"{f['flows']} requests in the period ({refs('flows')}), each from an identified caller or "
                   f"refused: {len(f['callers'])} caller identities; {unauth} unauthenticated request(s) refused with "
                   f"401 ({refs('unauthenticated')}).",
                   f"Refusals by reason: {_inline(f['refusals_by_reason']) or 'none'} ({refs('refusals')})."],
        "A.5.18": [f"Requests per identity: {_inline(f['requests_per_identity']) or 'none'} (table: who called what).",
                   f"Groups per identity: {_inline({k: ', '.join(v) for k, v in f['groups_per_identity'].items()}) or 'none'}.",
                   f"Policy decisions: {_inline(f['policy_decisions']) or 'none recorded'} (table: decisions by rule)."],
        "A.5.3": [f"{f['approvals']} approval(s), {f['approvals_approver_differs']} of them by an approver other "
                  f"than the requester; {len(f['approvals_approver_is_requester'])} self-approval(s)"
                  + (f" ({refs_text(f['approvals_approver_is_requester'], several)})"
                     if f["approvals_approver_is_requester"] else "")
                  + f"; {f['approval_attempts_refused']} attempt(s) to decide refused by the gateway"
                  + (f" ({refs('refused_decision_attempts')}; table: refused decision attempts)"
                     if f["approval_attempts_refused"] else "") + ".",
                  f"Approval events: {_inline(f['approval_outcomes']) or 'none'}; {f['flows_with_approval']} "
                  "request(s) carried an approval decision (table: approvals)."],
        "A.8.15": [f"{f['entries']} audit entries in the period, {f['flows']} of them requests, each linked to its "
                   f"flow file by flow id and digests; {f['checkpoints']} signed checkpoint(s) ({refs('checkpoints')}).",
                   f"Verifier: {v['status'].upper()} ({v['flows_matched']} of {v['flow_entries']} flow entries "
                   f"matched their recorded flow; signed with a trusted key up to {signed or 'nothing'}).",
                   f"Forwarded, outcome unknown: {f['forwarded_outcome_unknown']} request(s) reached the upstream "
                   "with no outcome recorded (the gateway stopped; table: forwarded, outcome unknown)."],
        "A.8.16": [f"Outcomes: {_inline(f['outcomes']) or 'none'}; {refused} refused request(s); status codes "
                   f"{_inline(f['status_codes']) or 'none'}.",
                   f"WebSocket: {ws['sessions']} session(s), {ws['messages_from_client']} message(s) from clients and "
                   f"{ws['messages_from_server']} from the model, {ws['blocked']} blocked, {ws['masked']} masked.",
                   f"Gateway starts: {f['gateway_starts']} ({refs('gateway_starts')}); restarts after a crash: "
                   f"{len(f['restarts_after_crash'])}; audit outages: {len(f['audit_outages'])}; witness outages: "
                   f"{len(f['witness_outages'])}; flow records reported lost by the gateway: "
                   f"{sum(r['count'] for r in f['records_lost_reports'])}."],
        "A.8.11": [f"Masked entities by type: {_inline(f['masked_entities_by_type']) or 'none'} "
                   f"(by direction: {_inline(f['masked_entities_by_direction']) or 'none'}); "
                   f"{f['flows_with_masking']} request(s) with masking applied ({refs('masked')}). Types and counts "
                   "only: the log never holds the masked values."],
        "A.5.33": [f"Hash chain and signatures: {v['status'].upper()}; signing key(s) "
                   f"{', '.join(k[:16] for k in f['signing_keys']) or 'none'}; key rotations: {len(f['key_rotations'])}.",
                   "Configuration in force: " + ("; ".join(
                       f"{c['instance']}: " + ", ".join(f"{n} sha256:{d[:16]}…" for n, d in c["files"].items())
                       + f" (recorded at {refs_text([c['entry']], several)})"
                       for c in f["config_in_force_per_instance"]) or "not recorded")
                   + f"; {len(t['config_changes'])} file change(s) recorded in the period ({refs('config')})."],
    }
    return [{"id": cid, "title": title, "iso27001_2013": old, "evidence": evidence[cid]} for cid, title, old in CONTROLS]


def _inline(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items())


# ---- rendering ---------------------------------------------------------------------------------------

# Each table of the pack: its heading, its columns (key, header) and what it says when empty.
TABLES = [
    ("who_called_what", "Who called what", [("caller", "caller"), ("instance", "instance"), ("endpoint", "endpoint"),
                                             ("model", "model"), ("requests", "requests"), ("served", "served"),
                                             ("refused", "refused"), ("failed", "failed"), ("entries", "audit entries")],
     "no requests in the period"),
    ("decisions_by_rule", "Decisions by rule", [("rule", "rule"), ("action", "action"), ("requests", "requests"),
                                                 ("entries", "audit entries")], "no requests in the period"),
    ("approvals", "Approvals", [("approval_id", "approval"), ("rule", "rule"), ("requester", "requester"),
                                ("requested_at", "requested at (UTC)"), ("requested_on", "held on"),
                                ("decision", "decision"), ("approver", "approver"), ("decided_at", "decided at (UTC)"),
                                ("decided_on", "decided on"), ("reason", "reason"), ("entries", "audit entries")],
     "no approvals in the period"),
    ("refused_decision_attempts", "Refused decision attempts",
     [("time", "when (UTC)"), ("who", "who tried"), ("attempted", "tried to"), ("requester", "requested by"),
      ("approval_id", "approval"), ("code", "refused as"), ("why", "why"), ("entry", "audit entry")],
     "no refused attempts in the period"),
    ("config_changes", "Configuration changes",
     [("time", "when (UTC)"), ("instance", "instance"), ("file", "file"), ("old", "old digest"), ("new", "new digest"),
      ("rules_changed", "rule ids changed"), ("reason", "recorded because"), ("entry", "audit entry")],
     "no configuration records in the period"),
    ("masking", "Masked personal data", [("entity_type", "entity type"), ("count", "entities masked"),
                                         ("entries", "audit entries")], "nothing masked in the period"),
    ("outcome_unknown", "Forwarded, outcome unknown",
     [("time", "when (UTC)"), ("instance", "instance"), ("caller", "caller"), ("request", "request"),
      ("flow_id", "flow"), ("entry", "audit entry")], "none: every forwarded request has its outcome recorded"),
]


def _cell(row: dict, key: str, several: bool) -> str:
    value = row.get(key)
    if key in ("entries", "entry"):
        return refs_text(value if isinstance(value, list) else [value], several) if value else "—"
    if key in ("old", "new"):
        return _text(value)
    return _text(value)


def _config_cell(row: dict) -> str:
    return f"{row['old']} → {row['new']}"


def _websocket_rows(ws: dict, several: bool) -> list[tuple[str, int, str]]:
    e = ws["entries"]
    return [("sessions", ws["sessions"], refs_text(e["sessions"], several)),
            ("messages from clients", ws["messages_from_client"], refs_text(e["sessions"], several)),
            ("messages from the model", ws["messages_from_server"], refs_text(e["sessions"], several)),
            ("messages blocked", ws["blocked"], refs_text(e["sessions"], several)),
            ("messages masked", ws["masked"], refs_text(e["sessions"], several)),
            ("client events decided by policy", ws["events_decided"], refs_text(e["events"], several)),
            ("client events blocked", ws["events_blocked"], refs_text(e["events_blocked"], several)),
            ("model responses", ws["responses"], refs_text(e["responses"], several)),
            ("model responses masked", ws["responses_masked"], refs_text(e["responses_masked"], several))]


def _verification_rows(v: dict) -> list[list[str]]:
    return [[p["instance"], p["records_dir"], p["status"].upper(), str(p["entries"]),
             f"{p['first_seq']}–{p['last_seq']}" if p["entries"] else "—", str(p["signed_upto"]),
             f"{p['flows_matched']} of {p['flow_entries']}", p["tail"], p["trust_source"]] for p in v["instances"]]


VERIFICATION_HEADERS = ["instance", "records directory", "verifier", "entries", "seq", "signed up to seq",
                        "flows matched", "end of the log", "trusted key from"]
FINDING_HEADERS = ["instance", "severity", "finding", "where", "what"]


def _finding_rows(v: dict) -> list[list[str]]:
    return [[f["instance"], f["severity"].upper(), f["kind"], f["where"], f["message"]] for f in v["findings"]]


def render_markdown(pack: dict) -> str:
    v = pack["verification"]
    several = len(pack["figures"]["instances"]) > 1

    def table(headers: list[str], rows: list[list[str]]) -> list[str]:
        clean = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        return (["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
                + ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows] + [""])

    out = ["# AI gateway evidence pack — ISO/IEC 27001:2022", "",
           f"Instances: {', '.join(pack['figures']['instances'])}  ",
           f"Period: {pack['period']['from']} .. {pack['period']['to']}  ",
           f"Generated: {pack['generated']}", "",
           f"**Audit log verification: {v['status'].upper()}** (exit code {v['exit_code']}; {v['entries']} entries)", "",
           "Every figure names its audit entries as `seq N` (or `instance: N` over several instances): the sequence "
           "numbers of the audit log, which `auditgate verify` checks.", ""]
    out += table(VERIFICATION_HEADERS, _verification_rows(v))
    for control in pack["controls"]:
        out += [f"## {control['id']} {control['title']} (ISO/IEC 27001:2013: {', '.join(control['iso27001_2013'])})", ""]
        out += [f"- {line}" for line in control["evidence"]] + [""]
    for key, title, columns, empty in TABLES:
        rows = pack["tables"][key]
        out += [f"## {title}", ""]
        if not rows:
            out += [empty, ""]
            continue
        cols = [c for c in columns if c[0] != "new"]
        out += table([h if k != "old" else "old → new digest" for k, h in cols],
                     [[(_config_cell(r) if k == "old" else _cell(r, k, several)) for k, _ in cols] for r in rows])
    out += ["## WebSocket sessions", ""]
    out += table(["what", "count", "audit entries"], [[a, str(b), c] for a, b, c in _websocket_rows(pack["figures"]["websocket"], several)])
    out += ["## Traffic over time", "", "| from (UTC) | served | refused | failed |", "| --- | --- | --- | --- |"]
    out += [f"| {b['start']} | {b['served']} | {b['refused']} | {b['failed']} |" for b in pack["timeline"]["buckets"]]
    out += ["", "## Verifier findings", ""]
    out += table(FINDING_HEADERS, _finding_rows(v)) if v["findings"] else ["none", ""]
    out += ["## How to check these records yourself", ""]
    check = pack.get("self_check")
    if check:
        out += [check["text"] + f" The entry: {check['where']}.", ""]
        for command in check["commands"]:
            out += ["```bash", command, "```", ""]
    else:
        out += [NO_SELF_CHECK, ""]
    out += ["## What this pack cannot show", ""]
    out += [f"- {line}" for line in pack["cannot_show"]]
    return "\n".join(out) + "\n"


def _timeline(flows: list[dict]) -> dict:
    if not flows:
        return {"bucket_seconds": 0, "buckets": []}
    times = [datetime.fromisoformat(e["time"].replace("Z", "+00:00")) for e in flows]
    start, end = min(times), max(times)
    span = (end - start).total_seconds()
    bucket = next((s for s in (60, 300, 900, 3600, 21600, 86400, 604800) if span / s <= 48), 2592000)
    origin = datetime.fromtimestamp(int(start.timestamp()) // bucket * bucket, timezone.utc)
    count = int((end - origin).total_seconds() // bucket) + 1
    buckets = [{"start": (origin + timedelta(seconds=i * bucket)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "served": 0, "refused": 0, "failed": 0} for i in range(count)]
    for moment, entry in zip(times, flows):
        buckets[int((moment - origin).total_seconds() // bucket)][_outcome(entry)] += 1
    return {"bucket_seconds": bucket, "buckets": buckets}


def render_svg(timeline: dict) -> str:
    buckets = timeline["buckets"]
    width, height, left, bottom, top = 720, 220, 44, 36, 12
    if not buckets:
        return f'<svg width="{width}" height="60" role="img" aria-label="no traffic"><text x="10" y="30">no traffic in the period</text></svg>'
    peak = max(b["served"] + b["refused"] + b["failed"] for b in buckets) or 1
    plot_h, slot = height - bottom - top, (width - left - 10) / len(buckets)
    colours = {"served": "#2e7d32", "refused": "#ef6c00", "failed": "#c62828"}
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="requests per {timeline["bucket_seconds"]} s: served, refused, failed">',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#555"/>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#555"/>',
             f'<text x="{left - 6}" y="{top + 10}" text-anchor="end" font-size="11">{peak}</text>',
             f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" font-size="11">0</text>']
    for i, bucket in enumerate(buckets):
        y = top + plot_h
        for series in ("served", "refused", "failed"):
            h = bucket[series] / peak * plot_h
            if h:
                y -= h
                parts.append(f'<rect x="{left + i * slot + 1:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" '
                             f'height="{h:.1f}" fill="{colours[series]}"><title>{html.escape(bucket["start"])}: '
                             f'{bucket[series]} {series}</title></rect>')
    for i in (0, len(buckets) - 1):
        anchor = "start" if i == 0 else "end"
        x = left + i * slot + (0 if i == 0 else slot)
        parts.append(f'<text x="{x:.1f}" y="{height - 20}" text-anchor="{anchor}" font-size="11">'
                     f'{html.escape(buckets[i]["start"])}</text>')
    for n, (series, colour) in enumerate(colours.items()):
        parts.append(f'<rect x="{left + n * 90}" y="{height - 12}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + n * 90 + 14}" y="{height - 3}" font-size="11">{series}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(pack: dict) -> str:
    e = html.escape
    v = pack["verification"]
    several = len(pack["figures"]["instances"]) > 1
    colour = {"verified": "#2e7d32", "incomplete": "#ef6c00", "failed": "#c62828"}.get(v["status"], "#c62828")

    def table(table_id: str, headers: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th scope=\"col\">{e(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def section(section_id: str, title: str, content: str) -> str:
        return f'<section id="{section_id}"><h2>{e(title)}</h2>{content}</section>'

    body = ["<h1>AI gateway evidence pack — ISO/IEC 27001:2022</h1>",
            f"<p>Instances: {e(', '.join(pack['figures']['instances']))}<br>Period: {e(pack['period']['from'])} .. "
            f"{e(pack['period']['to'])} (UTC)<br>Generated: {e(pack['generated'])}</p>",
            f'<p class="verdict" style="border-color:{colour}"><strong>Audit log verification: '
            f"{e(v['status'].upper())}</strong> (exit code {v['exit_code']}; {v['entries']} entries)</p>",
            "<p>Every figure names its audit entries by sequence number (<em>seq N</em>, or <em>instance: N</em> "
            "over several instances): the numbers <code>auditgate verify</code> checks.</p>",
            section("verification", "Verification per instance", table("verification-table", VERIFICATION_HEADERS,
                                                                         _verification_rows(v))),
            section("timeline", "Traffic and decisions over time", render_svg(pack["timeline"]))]
    for control in pack["controls"]:
        body.append(section(f"control-{control['id']}", f"{control['id']} {control['title']}",
                            f"<p><small>ISO/IEC 27001:2013: {e(', '.join(control['iso27001_2013']))}</small></p><ul>"
                            + "".join(f"<li>{e(line)}</li>" for line in control["evidence"]) + "</ul>"))
    for key, title, columns, empty in TABLES:
        rows = pack["tables"][key]
        if not rows:
            body.append(section(key.replace("_", "-"), title, f"<p class=\"empty\">{e(empty)}</p>"))
            continue
        cols = [c for c in columns if c[0] != "new"]
        headers = [h if k != "old" else "old → new digest" for k, h in cols]
        cells = [[(_config_cell(r) if k == "old" else _cell(r, k, several)) for k, _ in cols] for r in rows]
        body.append(section(key.replace("_", "-"), title, table(f"{key.replace('_', '-')}-table", headers, cells)))
    body.append(section("websocket", "WebSocket sessions", table(
        "websocket-table", ["what", "count", "audit entries"],
        [[a, str(b), c] for a, b, c in _websocket_rows(pack["figures"]["websocket"], several)])))
    body.append(section("findings", "Verifier findings", table("findings-table", FINDING_HEADERS, _finding_rows(v))
                        if v["findings"] else '<p class="empty">none</p>'))
    check = pack.get("self_check")
    body.append(section("self-check", "How to check these records yourself", (
        f"<p>{e(check['text'])} The entry: {e(check['where'])}.</p>"
        + "".join(f"<pre><code>{e(command)}</code></pre>" for command in check["commands"]))
        if check else f'<p class="empty">{e(NO_SELF_CHECK)}</p>'))
    body.append(section("cannot-show", "What this pack cannot show",
                        "<ul>" + "".join(f"<li>{e(line)}</li>" for line in pack["cannot_show"]) + "</ul>"))
    style = ("body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "table{border-collapse:collapse;margin:.5rem 0}"
             "th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top;font-size:.85rem}"
             "th{background:#f0f0f0}.verdict{border-left:.4rem solid;padding:.5rem 1rem;background:#fafafa}"
             "small{color:#666;font-weight:normal}.empty{color:#555;font-style:italic}"
             "pre{background:#f6f6f6;padding:.5rem;overflow-x:auto;font-size:.8rem}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>AI gateway evidence pack</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_evidence_pack(records_dirs: Path | list[Path], out: Path, date_from: str | None = None,
                        date_to: str | None = None, pubkeys: list[Path] | None = None,
                        witnesses: list | None = None) -> dict:
    """Verify each records directory (with the witnesses, if any) and write one pack over all of them."""
    from auditgate.audit.witness import check_tail, tail_status

    directories = [records_dirs] if isinstance(records_dirs, (str, Path)) else list(records_dirs)
    results = []
    for directory in directories:
        result = verify(Path(directory), pubkeys)
        check_tail(result, witnesses or [])
        results.append(result)
    pack = build_evidence(results, date_from, date_to, tails=[tail_status(r, bool(witnesses)) for r in results])
    # The pack names callers and quotes audit entries: 0600 files, and 0700 for the directories made here
    # (an --out directory that exists keeps its mode: the operator chose where it goes).
    private_dir(out)
    write_private_atomically(out / "evidence.json", json.dumps(pack, indent=2, sort_keys=True) + "\n")
    write_private_atomically(out / "report.md", render_markdown(pack))
    write_private_atomically(out / "report.html", render_html(pack))
    return pack


def _same_person(entry: dict) -> bool:
    """An approval by its own requester: the same stable subject, or names that read the same (NFKC,
    invisible characters removed, case folded) — a zero-width space makes no second person."""
    details = _details(entry)
    requester = entry.get("requester_principal") or details.get("requester_principal")
    approver = entry.get("approver_principal") or details.get("approver_principal")
    if requester and approver and requester == approver:
        return True
    return normalized_name(entry.get("requester")) is not None and (
        normalized_name(entry.get("requester")) == normalized_name(entry.get("approver")))
