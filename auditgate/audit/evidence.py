"""The ISO/IEC 27001 evidence pack: figures per Annex A control from a verified audit log, as Markdown, HTML, JSON.

Plain Python plus `cryptography` (through the verifier); no mitmproxy, no network, no external assets.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from auditgate.approval.rules import normalized_name
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
    "That the log is complete after its last signed checkpoint: entries after it are only hash-chained, and the "
    "very end of a log can be cut off at a line boundary without a trace in the chain (the flow-file cross-check "
    "catches it only while the flow files are intact).",
    "That the signing key was not stolen from the gateway host: whoever holds the private key can sign a rewritten "
    "log. The key is kept outside the records; its custody is the operator's.",
    "That the gateway's clock was right: entry times are the gateway host's UTC clock.",
    "That masking found every piece of personal data: it counts what its recognisers matched, by type.",
    "The content of pass-through tunnels, which the gateway neither decrypts nor records.",
    "Whether a rules change was authorised: the log shows the digest of every rules file in force and when it "
    "changed, not who changed it.",
]


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
    return identity.get("name", "(unnamed)") if isinstance(identity, dict) else "(unauthenticated)"


def _outcome(entry: dict) -> str:
    if entry.get("refusal"):
        return "refused"
    status = entry.get("status")
    if entry.get("error") or status is None or status >= 500:
        return "failed"
    return "served"


def _sample(located: Located) -> dict:
    return {"where": located.where, "entry": located.entry}


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


def build_evidence(result: VerifyResult, date_from: str | None = None, date_to: str | None = None) -> dict:
    """Figures per control from the verifier's parsed log (so that what is counted is what was verified)."""
    start, end = _day(date_from, False), _day(date_to, True)
    everything = [l for l in result.log if isinstance(l.seq, int) and isinstance(l.entry.get("time"), str)]
    in_period = [l for l in everything if (not start or l.entry["time"] >= start) and (not end or l.entry["time"] <= end)]
    flows = [l for l in in_period if l.entry.get("kind") == "flow"]
    of_kind = lambda kind: [l for l in in_period if l.entry.get("kind") == kind]  # noqa: E731

    per_identity = Counter(_name(l.entry.get("identity")) for l in flows)
    groups = {}
    for l in flows:
        identity = l.entry.get("identity")
        if isinstance(identity, dict):
            groups.setdefault(identity.get("name"), set()).update(identity.get("groups") or [])
    refusals = Counter((l.entry.get("refusal") or {}).get("code", "(unknown)") for l in flows if l.entry.get("refusal"))
    outcomes = Counter(_outcome(l.entry) for l in flows)
    policy = Counter()
    for l in flows:
        decision = l.entry.get("policy")
        if isinstance(decision, dict):
            policy[str(decision.get("decision") or decision.get("outcome") or decision.get("action") or "(recorded)")] += 1

    approval_events = of_kind("approval")  # requested, approved, denied, expired, refused_* (a refused attempt)
    decided = Counter(str(l.entry.get("decision")) for l in approval_events)
    approvals = [l for l in approval_events if l.entry.get("decision") == "approved" and l.entry.get("approver")]
    same = [l for l in approvals if _same_person(l.entry)]
    refused_attempts = [l for l in approval_events if str(l.entry.get("decision")).startswith("refused_")]
    flows_with_approval = [l for l in flows if isinstance(l.entry.get("approval"), dict)]

    masked_by_type, masked_by_direction, masked_flows = Counter(), Counter(), 0
    for l in flows:
        masking = l.entry.get("masking")
        findings = masking.get("findings") if isinstance(masking, dict) else None
        if findings:
            masked_flows += 1
            for finding in findings:
                if isinstance(finding, dict):
                    count = finding.get("count") if isinstance(finding.get("count"), int) else 1
                    masked_by_type[str(finding.get("entity_type"))] += count
                    masked_by_direction[str(finding.get("direction"))] += count

    configs_before = [l for l in everything if l.entry.get("kind") == "config" and (not end or l.entry["time"] <= end)]
    in_force = configs_before[-1] if configs_before else None
    config_changes = [{"where": l.where, "time": l.entry["time"], "reason": l.entry.get("reason"),
                       "files": l.entry.get("files")} for l in of_kind("config")]
    checkpoints = of_kind("checkpoint")
    starts = of_kind("gateway_start")
    outages = of_kind("audit_resumed")

    figures = {
        "entries": len(in_period),
        "flows": len(flows),
        "callers": sorted(n for n in per_identity if n != "(unauthenticated)"),
        "requests_per_identity": dict(sorted(per_identity.items())),
        "groups_per_identity": {k: sorted(v) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))},
        "outcomes": dict(sorted(outcomes.items())),
        "refusals_by_reason": dict(sorted(refusals.items())),
        "status_codes": dict(sorted(Counter(str(l.entry.get("status")) for l in flows).items())),
        "models": dict(sorted(Counter(str(l.entry.get("model")) for l in flows).items())),
        "policy_decisions": dict(sorted(policy.items())),
        "approval_events": len(approval_events),
        "approval_outcomes": dict(sorted(decided.items())),
        "approvals": len(approvals),
        "approvals_approver_differs": len(approvals) - len(same),
        "approvals_approver_is_requester": [l.where for l in same],
        "approval_attempts_refused": len(refused_attempts),
        "flows_with_approval": len(flows_with_approval),
        "masked_entities_by_type": dict(sorted(masked_by_type.items())),
        "masked_entities_by_direction": dict(sorted(masked_by_direction.items())),
        "flows_with_masking": masked_flows,
        "config_in_force": {"where": in_force.where, "time": in_force.entry["time"],
                            "files": in_force.entry.get("files")} if in_force else None,
        "config_changes": config_changes,
        "checkpoints": len(checkpoints),
        "signing_keys": sorted({str(l.entry.get("key_id")) for l in checkpoints}),
        "key_rotations": [l.where for l in of_kind("key_rotation")],
        "gateway_starts": len(starts),
        "restarts_after_crash": [l.where for l in starts if l.entry.get("recovered")],
        "audit_outages": [{"where": l.where, "since": l.entry.get("unavailable_since"),
                           "refused_requests": l.entry.get("refused_requests")} for l in outages],
        # Flow records the gateway itself reported lost (a full disk, a writer that died): not removed later.
        "records_lost_reports": [{"where": l.where, "reason": l.entry.get("reason"), "count": l.entry.get("count")}
                                 for l in of_kind("records_lost")],
    }
    pick = lambda items: [_sample(l) for l in items[:SAMPLE_LIMIT]]  # noqa: E731
    samples = {
        "flows": pick([l for l in flows if not l.entry.get("refusal")]),
        "refusals": pick([l for l in flows if l.entry.get("refusal")]),
        "approvals": pick(approvals),
        "masked": pick([l for l in flows if (l.entry.get("masking") or {}).get("findings")]),
        "checkpoints": pick(checkpoints[-1:]),
        "config": pick([in_force] if in_force else []),
    }
    verification = {
        "status": result.status, "exit_code": result.exit_code, "entries": result.entries,
        "first_seq": result.first_seq, "last_seq": result.last_seq, "signed_upto": result.signed_upto,
        "checkpoints": result.checkpoints, "trusted_keys": result.anchors, "trust_source": result.anchor_source,
        "flow_entries": result.flow_entries, "flows_matched": result.flows_matched,
        "findings": [f.__dict__ for f in result.findings[:100]], "summary": result.summary(),
    }
    controls = _controls(figures, verification)
    period = {"from": in_period[0].entry["time"] if in_period and not start else (start or None),
              "to": in_period[-1].entry["time"] if in_period and not end else (end or None)}
    return {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "records_dir": result.records_dir,
            "period": period, "controls": controls, "figures": figures, "timeline": _timeline([l.entry for l in flows]),
            "samples": samples, "verification": verification, "cannot_show": CANNOT_SHOW}


def _controls(f: dict, v: dict) -> list[dict]:
    refused = sum(f["refusals_by_reason"].values())
    unauth = f["refusals_by_reason"].get("gateway_unauthenticated", 0)
    evidence = {
        "A.5.15": [f"{f['flows']} requests in the period, each from an identified caller or refused: "
                   f"{len(f['callers'])} caller identities; {unauth} unauthenticated request(s) refused with 401.",
                   f"Refusals by reason: {_inline(f['refusals_by_reason']) or 'none'}."],
        "A.5.18": [f"Requests per identity: {_inline(f['requests_per_identity']) or 'none'}.",
                   f"Groups per identity: {_inline({k: ', '.join(v) for k, v in f['groups_per_identity'].items()}) or 'none'}.",
                   f"Policy decisions: {_inline(f['policy_decisions']) or 'none recorded'}."],
        "A.5.3": [f"{f['approvals']} approval(s), {f['approvals_approver_differs']} of them by an approver other "
                  f"than the requester; {len(f['approvals_approver_is_requester'])} self-approval(s)"
                  + (f" at {', '.join(f['approvals_approver_is_requester'])}" if f["approvals_approver_is_requester"] else "")
                  + f"; {f['approval_attempts_refused']} attempt(s) to decide refused by the gateway.",
                  f"Approval events: {_inline(f['approval_outcomes']) or 'none'}; {f['flows_with_approval']} "
                  "request(s) carried an approval decision."],
        "A.8.15": [f"{f['entries']} audit entries in the period, {f['flows']} of them requests, each linked to its "
                   f"flow file by flow id and body digests; {f['checkpoints']} signed checkpoint(s).",
                   f"Verifier: {v['status'].upper()} ({v['flows_matched']} of {v['flow_entries']} flow entries "
                   f"matched their recorded flow; entries up to seq {v['signed_upto']} signed with a trusted key)."],
        "A.8.16": [f"Outcomes: {_inline(f['outcomes']) or 'none'}; {refused} refused request(s); status codes "
                   f"{_inline(f['status_codes']) or 'none'}.",
                   f"Gateway starts: {f['gateway_starts']}; restarts after a crash: {len(f['restarts_after_crash'])}; "
                   f"audit outages: {len(f['audit_outages'])}; flow records reported lost by the gateway: "
                   f"{sum(r['count'] for r in f['records_lost_reports'] if isinstance(r['count'], int))}."],
        "A.8.11": [f"Masked entities by type: {_inline(f['masked_entities_by_type']) or 'none'} "
                   f"(by direction: {_inline(f['masked_entities_by_direction']) or 'none'}); "
                   f"{f['flows_with_masking']} request(s) with masking applied. Types and counts only: the log never "
                   "holds the masked values."],
        "A.5.33": [f"Hash chain and signatures: {v['status'].upper()}; signing key(s) "
                   f"{', '.join(k[:16] for k in f['signing_keys']) or 'none'}; key rotations: {len(f['key_rotations'])}.",
                   "Configuration in force: " + (
                       ", ".join(f"{n} sha256:{d[:16]}…" for n, d in (f["config_in_force"]["files"] or {}).items())
                       + f" (recorded at {f['config_in_force']['where']})" if f["config_in_force"] else "not recorded")
                   + f"; {len(f['config_changes'])} configuration record(s) in the period."],
    }
    return [{"id": cid, "title": title, "iso27001_2013": old, "evidence": evidence[cid]} for cid, title, old in CONTROLS]


def _inline(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items())


# ---- rendering ---------------------------------------------------------------------------------------


def render_markdown(pack: dict) -> str:
    v = pack["verification"]
    out = ["# AI gateway evidence pack — ISO/IEC 27001:2022", "",
           f"Records: `{pack['records_dir']}`  ",
           f"Period: {pack['period']['from']} .. {pack['period']['to']}  ",
           f"Generated: {pack['generated']}", "",
           f"**Audit log verification: {v['status'].upper()}** (exit code {v['exit_code']}; "
           f"{v['entries']} entries, signed up to seq {v['signed_upto']}; trusted key: {v['trust_source']})", ""]
    for control in pack["controls"]:
        out += [f"## {control['id']} {control['title']} (ISO/IEC 27001:2013: {', '.join(control['iso27001_2013'])})", ""]
        out += [f"- {line}" for line in control["evidence"]] + [""]
    out += ["## Traffic over time", "", "| from (UTC) | served | refused | failed |", "| --- | --- | --- | --- |"]
    out += [f"| {b['start']} | {b['served']} | {b['refused']} | {b['failed']} |" for b in pack["timeline"]["buckets"]]
    out += ["", "## Sample entries", ""]
    for name, samples in pack["samples"].items():
        for sample in samples:
            out += [f"{name} — `{sample['where']}`:", "", "```json", json.dumps(sample["entry"], sort_keys=True), "```", ""]
    out += ["## Verifier output", "", "```text", v["summary"], "```", "", "## What this pack cannot show", ""]
    out += [f"- {line}" for line in pack["cannot_show"]]
    return "\n".join(out) + "\n"


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
    colour = {"verified": "#2e7d32", "incomplete": "#ef6c00", "failed": "#c62828"}[v["status"]]
    body = ["<h1>AI gateway evidence pack — ISO/IEC 27001:2022</h1>",
            f"<p>Records: <code>{e(pack['records_dir'])}</code><br>Period: {e(str(pack['period']['from']))} .. "
            f"{e(str(pack['period']['to']))}<br>Generated: {e(pack['generated'])}</p>",
            f'<p class="verdict" style="border-color:{colour}"><strong>Audit log verification: {e(v["status"].upper())}</strong>'
            f" (exit code {v['exit_code']}; {v['entries']} entries, signed up to seq {v['signed_upto']}; "
            f"trusted key: {e(v['trust_source'])})</p>",
            "<h2>Traffic and decisions over time</h2>", render_svg(pack["timeline"])]
    for control in pack["controls"]:
        body.append(f"<h2>{e(control['id'])} {e(control['title'])} <small>(2013: {e(', '.join(control['iso27001_2013']))})</small></h2>")
        body.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in control["evidence"]) + "</ul>")
    body.append("<h2>Figures</h2><table>")
    for name, value in pack["figures"].items():
        body.append(f"<tr><th>{e(name)}</th><td><code>{e(json.dumps(value, sort_keys=True))}</code></td></tr>")
    body.append("</table><h2>Sample entries</h2>")
    for name, samples in pack["samples"].items():
        for sample in samples:
            body.append(f"<p>{e(name)} — <code>{e(sample['where'])}</code></p>"
                        f"<pre>{e(json.dumps(sample['entry'], sort_keys=True, indent=1))}</pre>")
    body.append(f"<h2>Verifier output</h2><pre>{e(v['summary'])}</pre><h2>What this pack cannot show</h2>")
    body.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in pack["cannot_show"]) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "pre{background:#f5f5f5;padding:.5rem;overflow-x:auto;font-size:.8rem}table{border-collapse:collapse}"
             "th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top;font-size:.85rem}"
             ".verdict{border-left:.4rem solid;padding:.5rem 1rem;background:#fafafa}small{color:#666;font-weight:normal}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>AI gateway evidence pack</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_evidence_pack(records_dir: Path, out: Path, date_from: str | None = None, date_to: str | None = None,
                        pubkeys: list[Path] | None = None) -> dict:
    result = verify(records_dir, pubkeys)
    pack = build_evidence(result, date_from, date_to)
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
    requester, approver = entry.get("requester_principal"), entry.get("approver_principal")
    if requester and approver and requester == approver:
        return True
    return normalized_name(entry.get("requester")) is not None and (
        normalized_name(entry.get("requester")) == normalized_name(entry.get("approver")))
