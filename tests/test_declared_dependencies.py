"""What the code imports is what pyproject.toml declares: nothing is borrowed from another package's requirements."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from tests.gateway_process import ROOT

# Standard library modules newer than the oldest Python we support (imported behind a fallback).
_NEWER_STDLIB = {"compression"}
_OWN = {"auditgate", "addons", "tests", "auditgate_addons", "bench"}


def _imports(*folders: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {_normal(re.match(r"[A-Za-z0-9_.\-]+", r).group()) for r in requirements}


def _undeclared(imports: dict[str, set[str]], declared: set[str]) -> dict[str, list[str]]:
    distributions = packages_distributions()
    missing = {}
    for module, files in imports.items():
        if module in sys.stdlib_module_names or module in _NEWER_STDLIB or module in _OWN:
            continue
        providers = {_normal(d) for d in distributions.get(module, [])}
        if not providers & declared:
            missing[module] = sorted(files)
    return missing


def test_the_package_and_the_addons_import_only_declared_dependencies():
    assert _undeclared(_imports("auditgate", "addons"), _declared()) == {}


def test_the_tests_import_only_declared_dependencies_and_the_dev_extra():
    assert _undeclared(_imports("tests", "bench"), _declared("dev")) == {}


def test_zstandard_is_not_used_mitmproxys_zstd_is():
    assert "zstandard" not in _imports("auditgate", "addons", "tests")
