"""The `auditgate` operator command. Each module of this package adds its subcommands through `register()`.

The subcommand modules import what they need inside their handlers, so `auditgate verify` runs with
Python and `cryptography` alone (no mitmproxy, no Presidio).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auditgate", description="Operator commands for the auditgate gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    # Discovered rather than listed, so a capability brings its commands with its own module.
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
