"""The one loader of the YAML files in the rules directory: strict keys, and file:line in every error.

    file = RulesFile.read(rules_dir / "upstreams.yaml", {"upstreams", "passthrough"})
    with file.locating():                       # errors raised with at=(...) get their line
        for i, entry in enumerate(file.list_of_mappings("upstreams")):
            check_keys(file.path, f"upstreams[{i}]", entry, ALLOWED, at=("upstreams", i))

A file is composed once: the line of every mapping key and list item is kept by its path of keys
and indexes, so an error names the line of the key itself, or else of the closest entry around it.
Duplicate keys are errors (PyYAML would silently keep the last one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

At = tuple  # a path of mapping keys and list indexes: ("rules", 3, "match")


class ConfigError(ValueError):
    """A rules file is missing, unreadable or invalid; the message names the file, the line and the reason."""

    def __init__(self, path: str | Path, reason: str, line: int | None = None, at: At = ()) -> None:
        self.path = str(path)
        self.reason = reason
        self.line = line
        self.at = at
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {reason}")


class RulesFile:
    """A YAML rules file as read: its data, and the line of everything in it."""

    def __init__(self, path: Path, data: Any, lines: dict[At, int]) -> None:
        self.path, self.data, self.lines = Path(path), data, lines

    @classmethod
    def read(cls, path: Path, allowed_keys: set[str] | None = None, *, missing_ok: bool = False) -> RulesFile:
        """Read a file that must hold a mapping (empty reads as {}); missing_ok: a missing file reads as empty."""
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            if missing_ok:
                return cls(path, {}, {})
            raise ConfigError(path, "file not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(path, f"not UTF-8 text: {e.reason} at byte {e.start}") from None
        except OSError as e:
            raise ConfigError(path, f"cannot read: {e.strerror}") from None
        return cls.parse(text, path, allowed_keys)

    @classmethod
    def parse(cls, text: str, path: Path | str, allowed_keys: set[str] | None = None,
              shape: str = "a mapping at the top level") -> RulesFile:
        path = Path(path)
        loader = yaml.SafeLoader(text)
        try:
            # One parse: the node tree gives the lines, and the same tree is turned into the data.
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(path, f"invalid YAML: {getattr(e, 'problem', None) or e}",
                              mark.line + 1 if mark else None) from None
        finally:
            loader.dispose()
        file = cls(path, {} if data is None else data, _line_table(path, root))
        if not isinstance(file.data, dict):
            raise ConfigError(path, f"the file must hold {shape}", 1)
        if allowed_keys is not None:
            with file.locating():
                check_keys(path, "top level", file.data, allowed_keys)
        return file

    def line(self, *at: str | int) -> int | None:
        """The line of the node at `at`, else of the closest node around it."""
        for n in range(len(at), 0, -1):
            if at[:n] in self.lines:
                return self.lines[at[:n]]
        return None

    def error(self, reason: str, *at: str | int) -> ConfigError:
        return ConfigError(self.path, reason, self.line(*at), at)

    @contextlib.contextmanager
    def locating(self) -> Iterator[None]:
        """Inside: a ConfigError about this file that says where (at=...) but not its line gets the line."""
        try:
            yield
        except ConfigError as e:
            if e.line is None and e.at and Path(e.path) == self.path:
                raise ConfigError(e.path, e.reason, self.line(*e.at), e.at) from None
            raise

    def list_of_mappings(self, key: str) -> list[dict[str, Any]]:
        return require_list_of_mappings(self.path, key, self.data.get(key), at=(key,))


def _line_table(path: Path, root: yaml.Node | None) -> dict[At, int]:
    lines: dict[At, int] = {}

    def walk(node: yaml.Node, at: At) -> None:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                name = getattr(key, "value", None)
                if name in seen:
                    raise ConfigError(path, f"duplicate key {name!r}", key.start_mark.line + 1, at + (name,))
                seen.add(name)
                lines[at + (name,)] = key.start_mark.line + 1
                walk(value, at + (name,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[at + (i,)] = item.start_mark.line + 1
                walk(item, at + (i,))

    if root is not None:
        walk(root, ())
    return lines


def load_yaml_mapping(path: Path, allowed_keys: set[str]) -> dict[str, Any]:
    """The data of a rules file that must be a mapping whose top-level keys are all in allowed_keys."""
    return RulesFile.read(path, allowed_keys).data


def check_keys(path: Path, where: str, entry: dict[str, Any], allowed: set[str], at: At = ()) -> None:
    unknown = sorted(set(map(str, entry)) - allowed)
    if unknown:
        raise ConfigError(path, f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})",
                          at=at + (unknown[0],))


def require_list_of_mappings(path: Path, key: str, value: Any, at: At = ()) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(path, f"'{key}' must be a list of mappings", at=at)
    return value
