"""Strict loading of the YAML files in the rules directory: unknown keys are errors, not ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A rules file is missing, unreadable or invalid; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str, line: int | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.line = line
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {reason}")


def load_yaml_mapping(path: Path, allowed_keys: set[str]) -> dict[str, Any]:
    """Read a YAML file that must be a mapping whose top-level keys are all in allowed_keys.

    An empty file reads as an empty mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(path, f"invalid YAML: {getattr(e, 'problem', e)}", mark.line + 1 if mark else None) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "the file must hold a mapping at the top level")
    check_keys(path, "top level", data, allowed_keys)
    return data


def check_keys(path: Path, where: str, entry: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(path, f"{where}: unknown key(s) {', '.join(map(str, unknown))} (allowed: {', '.join(sorted(allowed))})")


def require_list_of_mappings(path: Path, key: str, value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(path, f"'{key}' must be a list of mappings")
    return value
