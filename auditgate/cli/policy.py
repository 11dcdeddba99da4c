"""`auditgate policy check [--rules DIR]`: validate policy.yaml as the gateway would, before it is deployed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from auditgate.core.shipped import DEFAULT_RULES_DIR


def _check(args: argparse.Namespace) -> int:
    from auditgate.core.config import ConfigError
    from auditgate.policy.rules import POLICY_FILE, load_policy

    path = Path(args.rules) / POLICY_FILE
    try:
        policy = load_policy(path)
        if policy.uses_pii:
            from auditgate.policy.loading import (
                PiiTypes,  # the masking engine, as the gateway builds it
            )

            PiiTypes(Path(args.rules)).check(policy)
    except ConfigError as e:
        print(f"auditgate: {e}", file=sys.stderr)
        return 1
    print(f"{path}: {len(policy.rules)} rule(s), default {policy.default} ({policy.digest})")
    for rule in policy.rules:
        extra = f" by {', '.join(rule.approvers)} within {rule.timeout_seconds:g}s" if rule.approvers else ""
        print(f"  {rule.line or '?':>4}  {rule.id:<32} {rule.action}{extra}")
    return 0


def register(commands) -> None:
    policy = commands.add_parser("policy", help="policy rules").add_subparsers(dest="action", required=True)
    check = policy.add_parser("check", help="validate policy.yaml (file, line and reason of any problem)")
    check.add_argument("--rules", default=DEFAULT_RULES_DIR, help="the gateway's rules directory (default: rules)")
    check.set_defaults(handler=_check)
