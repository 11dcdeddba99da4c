"""The addon modules: each loads on its own in a real mitmdump, none imports another, the bundle lists them all."""

from __future__ import annotations

import ast
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from auditgate.core.shipped import SHIPPED_RULES
from tests.conftest import gateway_env
from tests.gateway_process import ROOT, run_mitmdump

ADDONS_DIR = ROOT / "addons"
ADDON_MODULES = sorted(p for p in ADDONS_DIR.glob("*.py") if p.stem not in ("__init__", "gateway"))


def _imported_modules(path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__", "load_addon_module", "spec_from_file_location"):
            names.add("<dynamic import>")
    return names


def test_every_addon_module_is_a_mitmproxy_script_with_an_addons_list():
    names = {p.stem for p in ADDON_MODULES}
    assert {"masking", "policy", "approval", "audit_log", "flow_recorder", "caller_auth"} <= names
    for path in ADDON_MODULES:
        assert "\naddons = [" in path.read_text(), f"{path.name} does not end with addons = [...]"


@pytest.mark.parametrize("path", ADDON_MODULES, ids=lambda p: p.stem)
def test_no_addon_module_imports_another(path):
    siblings = {p.stem for p in ADDONS_DIR.glob("*.py")}
    imported = _imported_modules(path)
    offending = sorted(name for name in imported if name.startswith(".") or name == "<dynamic import>"
                       or name.split(".")[0] in {"addons", *siblings} or name.startswith("auditgate_addons"))
    assert not offending, f"{path.name} imports {offending}: addons talk only through auditgate.core.flow_contract"


def test_the_bundle_lists_every_addon_module_once_in_request_order():
    tree = ast.parse((ADDONS_DIR / "gateway.py").read_text())
    [call] = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "bundle"]
    listed = [element.value for element in call.args[1].elts]
    assert sorted(listed) == sorted(p.stem for p in ADDON_MODULES) and len(set(listed)) == len(listed)
    # The request path reads top to bottom: routing before identity before policy before approval ...
    order = ["upstream_routing", "caller_auth", "authorization", "policy", "approval", "masking", "key_custody",
             "flow_recorder", "audit_log"]
    assert [name for name in listed if name in order] == order


def test_the_bundle_loads_its_modules_under_names_no_user_package_can_clash_with():
    from auditgate.core.addon_files import bundle

    index, *addons, freeze = bundle(str(ADDONS_DIR / "gateway.py"), ["overhead", "sse_streaming"])
    assert [type(a).__module__ for a in addons] == ["auditgate_addons.overhead", "auditgate_addons.sse_streaming"]
    assert type(index).__name__ == "DispatchIndex"  # mitmproxy's hook dispatch, made cheaper for the bundle
    assert type(freeze).__name__ == "HeapFreeze"  # last: the start-up heap out of the collector's way


@pytest.mark.e2e
def test_each_addon_module_loads_alone(tmp_path, confdir):
    # A script's module-level names are hooks to mitmproxy (a function called `load` is called as the
    # load hook), and it is not in sys.modules (dataclasses with string annotations fail there).
    empty = tmp_path / "empty.mitm"
    empty.write_bytes(b"")
    rules = tmp_path / "rules"  # a copy: a first start writes the operator's token into identities.yaml
    shutil.copytree(SHIPPED_RULES, rules)
    shipped_identities = (SHIPPED_RULES / "identities.yaml").read_bytes()

    def start(path):
        result = run_mitmdump(["-n", "-r", str(empty), "-s", str(path), "--set", f"confdir={confdir}",
                               "--set", f"gateway_rules={rules}",
                               "--set", f"gateway_records={tmp_path / path.stem}"], env=gateway_env(), timeout=90)
        return path.stem, result

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(start, [*ADDON_MODULES, ADDONS_DIR / "gateway.py"]))
    failures = {name: (r.stdout + r.stderr)[-1500:] for name, r in results
                if r.returncode != 0 or "error in script" in r.stdout + r.stderr or "Addon error" in r.stdout + r.stderr}
    assert not failures, failures
    assert (SHIPPED_RULES / "identities.yaml").read_bytes() == shipped_identities
