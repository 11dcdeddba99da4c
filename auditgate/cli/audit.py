"""`auditgate verify`, `auditgate evidence` and `auditgate audit rotate-key`: the audit log, checked offline.

Needs nothing beyond Python and `cryptography` (no mitmproxy): `python -m auditgate verify records`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _verify(args: argparse.Namespace) -> int:
    from auditgate.audit.verify import verify

    records = Path(args.records_dir)
    if not records.is_dir():
        print(f"auditgate: records directory {records} does not exist", file=sys.stderr)
        return 2
    try:
        result = verify(records, args.pubkey or None, check_flows=not args.skip_flows)
    except (OSError, ValueError) as e:
        print(f"auditgate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary())
    return result.exit_code


def _evidence(args: argparse.Namespace) -> int:
    from auditgate.audit.evidence import EvidenceError, write_evidence_pack

    records = Path(args.records_dir)
    if not records.is_dir():
        print(f"auditgate: records directory {records} does not exist", file=sys.stderr)
        return 2
    try:
        pack = write_evidence_pack(records, Path(args.out), args.date_from, args.date_to, args.pubkey or None)
    except (EvidenceError, OSError, ValueError) as e:
        print(f"auditgate: {e}", file=sys.stderr)
        return 2
    print(f"auditgate: evidence pack for {pack['period']['from']} .. {pack['period']['to']} written to {args.out} "
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
    verify.add_argument("records_dir", nargs="?", default="records", help="the gateway's records directory")
    verify.add_argument("--pubkey", action="append", type=Path,
                        help="a trusted public key (PEM), obtained independently of the records (repeatable)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.add_argument("--skip-flows", action="store_true", help="do not check the flow files")
    verify.set_defaults(handler=_verify)

    evidence = commands.add_parser("evidence", help="write an ISO/IEC 27001 evidence pack from the records")
    evidence.add_argument("records_dir", nargs="?", default="records", help="the gateway's records directory")
    evidence.add_argument("--from", dest="date_from", help="first day (YYYY-MM-DD, UTC) of the period")
    evidence.add_argument("--to", dest="date_to", help="last day (YYYY-MM-DD, UTC) of the period, included")
    evidence.add_argument("--out", required=True, help="directory to write report.md, report.html, evidence.json")
    evidence.add_argument("--pubkey", action="append", type=Path, help="trusted public key for the verifier")
    evidence.set_defaults(handler=_evidence)

    audit = commands.add_parser("audit", help="audit log maintenance").add_subparsers(dest="action", required=True)
    rotate = audit.add_parser("rotate-key", help="stage a new checkpoint signing key; the gateway adopts it")
    rotate.add_argument("--key", default="certs/audit-signing-key.pem", help="the gateway's signing key file")
    rotate.add_argument("--wait", type=float, default=5.0, help="seconds to wait for a running gateway to adopt it")
    rotate.set_defaults(handler=_rotate_key)
