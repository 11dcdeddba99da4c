"""`auditgate verify`, `auditgate evidence` and `auditgate audit rotate-key`: the audit log, checked offline.

Needs nothing beyond Python and `cryptography` (no mitmproxy): `python -m auditgate verify records`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Several directories: the exit code is the worst of them, in this order (a failure outranks everything).
_SEVERITY_OF_EXIT = {1: 3, 2: 2, 3: 1, 0: 0}


def _worst(codes: list[int]) -> int:
    return max(codes, key=lambda code: _SEVERITY_OF_EXIT.get(code, 2), default=0)


def _witnesses(specs: list[str] | None):
    from auditgate.audit.witness import parse_witness_source

    return [parse_witness_source(spec) for spec in specs or []]


def _verify(args: argparse.Namespace) -> int:
    from auditgate.audit.evidence import instance_name
    from auditgate.audit.verify import verify
    from auditgate.audit.witness import TAIL_UNCHECKED, WitnessError, check_tail

    try:
        witnesses = _witnesses(args.witness)
    except ValueError as e:
        print(f"auditgate: --witness: {e}", file=sys.stderr)
        return 2
    reports, codes = [], []
    for directory in args.records_dir or ["records"]:
        records = Path(directory)
        if not records.is_dir():
            print(f"auditgate: records directory {records} does not exist", file=sys.stderr)
            reports.append({"records_dir": str(records), "instance": records.name, "status": "unreadable",
                            "exit_code": 2, "error": "does not exist"})
            codes.append(2)
            continue
        try:
            result = verify(records, args.pubkey or None, check_flows=not args.skip_flows)
            check_tail(result, witnesses)
        except (OSError, ValueError, WitnessError) as e:
            print(f"auditgate: {records}: {e}", file=sys.stderr)
            reports.append({"records_dir": str(records), "instance": records.name, "status": "unreadable",
                            "exit_code": 2, "error": str(e)})
            codes.append(2)
            continue
        warnings = [] if witnesses else [TAIL_UNCHECKED]
        for warning in warnings:
            print(f"auditgate: warning: {records}: {warning}", file=sys.stderr)
        name = instance_name(result)
        summary = result.summary()
        if warnings:  # before the result line, where an auditor reads the findings
            head, _, last = summary.rpartition("\n")
            summary = "\n".join([head, *(f"  WARNING    tail unchecked: {w}" for w in warnings), last])
        reports.append(dict(result.as_dict(), instance=name, warnings=warnings) if args.json else
                       {"instance": name, "status": result.status, "exit_code": result.exit_code, "summary": summary})
        codes.append(result.exit_code)
    code = _worst(codes)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else {"instances": reports, "exit_code": code}, indent=2))
        return code
    for report in reports:
        print(report.get("summary") or f"auditgate verify: {report['records_dir']}: {report['error']}")
    if len(reports) > 1:
        print(f"auditgate verify: {len(reports)} instances, exit code {code} (the worst of them):")
        for report in reports:
            print(f"  {report['instance']}: {report['status'].upper()} (exit code {report['exit_code']})")
    return code


def _evidence(args: argparse.Namespace) -> int:
    from auditgate.audit.evidence import EvidenceError, write_evidence_pack
    from auditgate.audit.witness import WitnessError

    directories = [Path(d) for d in args.records_dir or ["records"]]
    for records in directories:
        if not records.is_dir():
            print(f"auditgate: records directory {records} does not exist", file=sys.stderr)
            return 2
    try:
        pack = write_evidence_pack(directories, Path(args.out), args.date_from, args.date_to, args.pubkey or None,
                                   witnesses=_witnesses(args.witness))
    except (EvidenceError, OSError, ValueError, WitnessError) as e:
        print(f"auditgate: {e}", file=sys.stderr)
        return 2
    print(f"auditgate: evidence pack for {pack['period']['from']} .. {pack['period']['to']} over "
          f"{len(directories)} records director{'y' if len(directories) == 1 else 'ies'} written to {args.out} "
          f"(report.md, report.html, evidence.json); verifier: {pack['verification']['status'].upper()}")
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    from auditgate.audit.chain import (
        create_private_key_file,
        key_id,
        load_private_key_file,
    )

    key_path = Path(args.key)
    if not key_path.exists():
        print(f"auditgate: no signing key at {key_path} (the gateway creates it at first start)", file=sys.stderr)
        return 2
    pending = key_path.with_name(key_path.name + ".next")
    try:
        new_key = create_private_key_file(pending)
    except FileExistsError:
        print(f"auditgate: a rotation is already pending ({pending}); start the gateway to complete it", file=sys.stderr)
        return 2
    old_id = key_id(load_private_key_file(key_path).public_key())
    new_id = key_id(new_key.public_key())
    print(f"auditgate: new audit signing key {new_id[:16]}… staged in {pending} (current: {old_id[:16]}…)")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline and pending.exists():
        time.sleep(0.2)
    if pending.exists():
        print("auditgate: the gateway has not taken it over yet; it does within a second when running, or at its "
              "next start, with a key_rotation entry signed by the old key")
    else:
        print("auditgate: the running gateway rotated the key: the key_rotation entry is signed by the old key, "
              "later checkpoints by the new one")
    return 0


def register(commands) -> None:
    verify = commands.add_parser("verify", help="verify the audit log offline: chain, signatures, flow digests")
    verify.add_argument("records_dir", nargs="*", help="records directories, one per instance (default: records); "
                        "the exit code is the worst of them (1 failed, 2 unreadable, 3 incomplete, 0 verified)")
    verify.add_argument("--witness", action="append",
                        help="a witness of the checkpoints (dir:PATH, http(s)://URL, file:EXPORT or a path), to "
                             "detect a cut tail, a deleted newest file or a rolled-back log (repeatable)")
    verify.add_argument("--pubkey", action="append", type=Path,
                        help="a trusted public key (PEM), obtained independently of the records (repeatable)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.add_argument("--skip-flows", action="store_true", help="do not check the flow files")
    verify.set_defaults(handler=_verify)

    evidence = commands.add_parser("evidence", help="write an ISO/IEC 27001 evidence pack from the records")
    evidence.add_argument("records_dir", nargs="*", help="records directories, one per instance (default: records)")
    evidence.add_argument("--from", dest="date_from", help="first day (YYYY-MM-DD, UTC) of the period")
    evidence.add_argument("--to", dest="date_to", help="last day (YYYY-MM-DD, UTC) of the period, included")
    evidence.add_argument("--out", required=True, help="directory to write report.md, report.html, evidence.json")
    evidence.add_argument("--pubkey", action="append", type=Path, help="trusted public key for the verifier")
    evidence.add_argument("--witness", action="append", help="a witness of the checkpoints, as for verify")
    evidence.set_defaults(handler=_evidence)

    audit = commands.add_parser("audit", help="audit log maintenance").add_subparsers(dest="action", required=True)
    rotate = audit.add_parser("rotate-key", help="stage a new checkpoint signing key; the gateway adopts it")
    rotate.add_argument("--key", default="certs/audit-signing-key.pem", help="the gateway's signing key file")
    rotate.add_argument("--wait", type=float, default=5.0, help="seconds to wait for a running gateway to adopt it")
    rotate.set_defaults(handler=_rotate_key)
