"""`auditgate token new NAME [--group G ...] [--rules DIR]`: mint a service token, store its hash, print it once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from auditgate.core.shipped import DEFAULT_RULES_DIR, ensure_rules_dir


def _token_new(args: argparse.Namespace) -> int:
    from auditgate.core.config import ConfigError
    from auditgate.identity.service_tokens import IDENTITIES_FILE, add_service_token

    rules = Path(args.rules)
    try:
        if ensure_rules_dir(rules, args.rules):
            print(f"auditgate: made {rules} from the shipped defaults", file=sys.stderr)
        if not rules.is_dir():
            print(f"auditgate: rules directory {rules} does not exist", file=sys.stderr)
            return 2
        token = add_service_token(rules, args.name, args.group)
    except ConfigError as e:
        print(f"auditgate: {e}", file=sys.stderr)
        return 2
    print(f"auditgate: added '{args.name}' to {rules / IDENTITIES_FILE}; its token is shown this once:", file=sys.stderr)
    print(token)
    return 0


def register(commands) -> None:
    token = commands.add_parser("token", help="service tokens for callers").add_subparsers(dest="action", required=True)
    new = token.add_parser("new", help="mint a token, store its hash, print it once")
    new.add_argument("name", help="the identity's name, as recorded with its flows")
    new.add_argument("--group", action="append", default=[], help="a group the identity belongs to (repeatable)")
    new.add_argument("--rules", default=DEFAULT_RULES_DIR,
                     help=f"the gateway's rules directory (default: {DEFAULT_RULES_DIR}, made from the shipped defaults "
                          "if missing)")
    new.set_defaults(handler=_token_new)
