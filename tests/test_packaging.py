"""What `pip install .` puts in an empty virtualenv: the auditgate package and its command, nothing named addons."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.gateway_process import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the tracked files: a build writes build/ and *.egg-info beside its source.
    source = out / "source"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # Offline: the build backend is the one already in this venv (no isolated build env to download).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    [built] = out.glob("auditgate-*.whl")
    return built


def test_the_wheel_holds_auditgate_its_data_files_and_no_addons_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"auditgate"}
    # Package data: the approver page and the shipped rules travel with the package.
    assert {"auditgate/approval/page/approvals.html", "auditgate/approval/page/approvals.js",
            "auditgate/defaults/rules/policy.yaml", "auditgate/defaults/rules/identities.yaml"} <= set(names)
    # Every module of the package travels, the ones git could be told to ignore included (an
    # ignore pattern for an operator's folder must never swallow a subpackage of the same name).
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "auditgate").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= set(names), sorted(modules - set(names))


def test_an_empty_venv_gets_the_auditgate_command_and_python_m_auditgate(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, command = venv / "bin" / "python", venv / "bin" / "auditgate"
    # --no-deps: no network in tests. The command's help needs none of the dependencies, by design.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import auditgate, importlib.util as u; print(auditgate.__file__); "
                           "print(u.find_spec('addons'))"], cwd=tmp_path, capture_output=True, text=True, check=True)
    package_file, addons_spec = site.stdout.splitlines()
    assert str(venv) in package_file and addons_spec == "None"
    helped = subprocess.run([str(command), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "verify" in helped.stdout and "token" in helped.stdout, helped.stderr
    verify_help = subprocess.run([str(python), "-m", "auditgate", "verify", "--help"], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
    assert verify_help.returncode == 0 and "records" in verify_help.stdout.lower(), verify_help.stderr
