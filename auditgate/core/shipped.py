"""The rules auditgate ships (package data) and the operator's own rules directory made from them.

The shipped files are never edited in place: an operator's edits, and the identity minted at first
start, go to the operator's directory (``rules/`` by default, git-ignored), which is copied from the
shipped defaults when it does not exist yet. Tests read their own copy of the shipped defaults.
"""

from __future__ import annotations

from pathlib import Path

from auditgate.core.private_files import copy_private_tree

SHIPPED_RULES = Path(__file__).resolve().parent.parent / "defaults" / "rules"
DEFAULT_RULES_DIR = "rules"


def copy_shipped_rules(target: Path) -> Path:
    """A fresh copy of the shipped rules at target (which must not exist yet): the directory 0700, its files
    0600 (identities.yaml will hold token hashes, upstreams.yaml where the upstream keys come from)."""
    return copy_private_tree(SHIPPED_RULES, target)


def ensure_rules_dir(directory: Path, option_value: str = DEFAULT_RULES_DIR) -> bool:
    """Make the default rules directory from the shipped rules if it is missing; True if it was made.

    Only the default location is made: a rules directory named explicitly that does not exist is a
    mistake the operator must hear about, not a reason to start with the permissive defaults.
    """
    if directory.exists() or option_value != DEFAULT_RULES_DIR:
        return False
    try:
        copy_shipped_rules(directory)
    except OSError as e:  # a read-only working directory: the start stops and says where
        # Imported here: the `auditgate` command's parser imports this module, and `auditgate verify`
        # must run without PyYAML.
        from auditgate.core.config import ConfigError

        raise ConfigError(directory, f"cannot make the rules directory from the shipped defaults: {e}") from None
    return True
