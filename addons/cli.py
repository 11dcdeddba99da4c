"""The `auditgate` operator command. Each `addons/*_cli.py` module adds its subcommands through `register()`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import addons


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auditgate", description="Operator commands for the auditgate gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    # Discovered rather than listed, so a capability brings its commands with its own module.
    for module in sorted(m.name for m in pkgutil.iter_modules(addons.__path__) if m.name.endswith("_cli")):
        importlib.import_module(f"addons.{module}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
