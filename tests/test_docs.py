"""The documentation says what the code does: the options table, the README's shape, and every relative link."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from auditgate.core.addon_files import load_addon_module
from auditgate.core.flow_contract import ALL_KEYS
from auditgate.core.heap_freeze import HeapFreeze
from auditgate.core.options import add_gateway_options

ROOT = Path(__file__).resolve().parent.parent
ADDONS_DIR = ROOT / "addons"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 12 * 1024

# | `name` | type | `default` | meaning |   (the default is a Python literal: "rules", 100, "")
OPTION_ROW = re.compile(r"^\|\s*`(?P<name>[a-z_]+)`\s*\|\s*(?P<type>\w+)\s*\|\s*`(?P<default>[^`]*)`\s*\|")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


class RecordingLoader:
    """Stands in for mitmproxy's loader: remembers every option declared."""

    def __init__(self) -> None:
        self.options: dict[str, tuple[type, object]] = {}

    def add_option(self, name, typespec, default, help, choices=None) -> None:
        declared = (typespec, default)
        # mitmproxy accepts one option declared twice only when both declarations are the same.
        assert self.options.setdefault(name, declared) == declared, f"{name} declared twice, differently"


@pytest.fixture(scope="module")
def declared_options() -> dict[str, tuple[type, object]]:
    loader = RecordingLoader()
    add_gateway_options(loader)
    for path in sorted(ADDONS_DIR.glob("*.py")):
        if path.stem in ("__init__", "gateway"):
            continue
        module = load_addon_module(ADDONS_DIR, path.stem)
        for addon in module.addons:
            if hasattr(addon, "load"):
                addon.load(loader)
            if hasattr(addon, "done"):
                addon.done()  # transport_errors patches mitmproxy in load() and restores it here
    HeapFreeze().load(loader)  # the bundle's own last addon (core/heap_freeze.py), in no module of addons/
    return loader.options


def _section(text: str, heading: str) -> str:
    """The body of the '## heading' section of a Markdown text."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def test_the_options_table_lists_every_option_with_its_real_default(declared_options):
    table = _section((DOCS / "operators.md").read_text(encoding="utf-8"), "Options")
    documented: dict[str, tuple[str, object]] = {}
    for line in table.splitlines():
        row = OPTION_ROW.match(line)
        if row:
            assert row["name"] not in documented, f"{row['name']} is listed twice"
            documented[row["name"]] = (row["type"], ast.literal_eval(row["default"]))
    assert sorted(documented) == sorted(declared_options)
    for name, (typespec, default) in declared_options.items():
        assert documented[name] == (typespec.__name__, default), f"{name}: the table says {documented[name]}"


def test_the_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}"


def test_the_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first = re.search(r"^## ([^\n]*)\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert first and "two commands" in first.group(1).lower()
    body = first.group(2)
    assert "./run_gateway.sh" in body and "./run_tests.sh" in body


def test_every_flow_metadata_key_is_in_the_developers_guide():
    text = (DOCS / "developers.md").read_text(encoding="utf-8")
    missing = [key.name for key in ALL_KEYS if f"`{key.name}`" not in text]
    assert not missing, f"docs/developers.md does not name {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*#*$", text, re.M)}


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_every_relative_link_points_at_something_that_exists():
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for link in _relative_links(page):
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.name}: {link}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, broken
