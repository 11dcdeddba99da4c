"""Every addon module of the bundle loads on its own in a real mitmdump, as mitmproxy loads a script."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from auditgate.core.shipped import SHIPPED_RULES
from tests.conftest import gateway_env
from tests.gateway_process import ROOT, run_mitmdump

pytestmark = pytest.mark.e2e

ADDON_MODULES = sorted(p for p in (ROOT / "addons").glob("*.py") if "\naddons = [" in p.read_text())


def test_the_list_of_addon_modules_is_complete():
    names = {p.stem for p in ADDON_MODULES}
    assert {"gateway", "masking", "policy", "approval", "audit_log", "flow_recorder", "caller_auth"} <= names


def test_each_addon_module_loads_alone(tmp_path, confdir):
    # A script's module-level names are hooks to mitmproxy (a function called `load` is called as the
    # load hook), and it is not in sys.modules (dataclasses with string annotations fail there).
    empty = tmp_path / "empty.mitm"
    empty.write_bytes(b"")
    (tmp_path / "shipped-identities.yaml").write_text((SHIPPED_RULES / "identities.yaml").read_text())
    rules = tmp_path / "rules"  # a copy: a first start writes the operator's token into identities.yaml
    shutil.copytree(SHIPPED_RULES, rules)

    def start(path):
        result = run_mitmdump(["-n", "-r", str(empty), "-s", str(path), "--set", f"confdir={confdir}",
                               "--set", f"gateway_rules={rules}",
                               "--set", f"gateway_records={tmp_path / path.stem}"], env=gateway_env(), timeout=90)
        return path.stem, result

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(start, ADDON_MODULES))
    failures = {name: (r.stdout + r.stderr)[-1500:] for name, r in results
                if r.returncode != 0 or "error in script" in r.stdout + r.stderr or "Addon error" in r.stdout + r.stderr}
    assert not failures, failures
    assert (SHIPPED_RULES / "identities.yaml").read_text() == (tmp_path / "shipped-identities.yaml").read_text()
