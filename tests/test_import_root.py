"""One import root: the wheel installs `enginesmith` only (its packages inside it), and a checkout imports the
same names from its top-level folders, never under their bare names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from enginesmith.triton_repo.repository import MODELS_DIR, helper_files
from tests.support import REPO_ROOT

PACKAGES = ("builders", "runtime", "triton_repo", "client")
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "enginesmith", *PACKAGES)
PROBE = """
import importlib.util, json, enginesmith, enginesmith.runtime.engine.engine, enginesmith.builders.cli
from enginesmith.triton_repo import discovery
from enginesmith.triton_repo.repository import MODELS_DIR, helper_files
print(json.dumps({"path": list(enginesmith.__path__), "cli": enginesmith.builders.cli.__file__,
                  "version": enginesmith.__version__, "stub_import_root": str(discovery.IMPORT_ROOT),
                  "bare": [m for m in %r if importlib.util.find_spec(m)],
                  "helpers": sorted(helper_files(MODELS_DIR / "preprocessing.py"))}))
""" % (PACKAGES,)


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M).group(1)


def _isolated_python(tmp_path: Path, target: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Python from a folder outside the checkout, on `target` and this interpreter's import path as plain paths,
    less any folder holding enginesmith or its packages (`-S`: no .pth file runs, so no editable install of a
    checkout answers either)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    plain = [p for p in sys.path if p and Path(p).is_dir()
             and not any((Path(p) / name).exists() for name in ("enginesmith", *PACKAGES))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *plain])}
    return subprocess.run([sys.executable, "-S", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """The wheel built offline from a copy of the sources, and the folder it is installed into (--target)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy2
        kw = {"ignore": shutil.ignore_patterns("__pycache__", "*.pyc")} if copy is shutil.copytree else {}
        copy(REPO_ROOT / name, src / name, **kw)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("enginesmith-*.whl")
    target = tmp / "target"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return wheel, target


def test_the_wheel_holds_the_enginesmith_import_root_only(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"enginesmith", f"enginesmith-{_pyproject_version()}.dist-info"}
    for path in ("enginesmith/__init__.py", "enginesmith/builders/__init__.py", "enginesmith/runtime/engine/engine.py",
                 "enginesmith/builders/specs/tiny-llama.json", "enginesmith/triton_repo/models/preprocessing.py",
                 "enginesmith/client/bench.py"):
        assert path in names
    dist_info = f"enginesmith-{_pyproject_version()}.dist-info"
    scripts = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "enginesmith = enginesmith.builders.cli:main" in scripts
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and f"{dist_info}/licenses/LICENSE" in names


def test_installed_it_imports_under_enginesmith_and_not_under_the_bare_names(installed, tmp_path):
    _, target = installed
    r = _isolated_python(tmp_path, target, ["-c", PROBE])
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout.splitlines()[-1])
    assert facts["path"] == [str(target / "enginesmith")]  # no checkout folder joins an installed package
    assert facts["cli"] == str(target / "enginesmith" / "builders" / "cli" / "__init__.py")
    assert facts["version"] == _pyproject_version()
    assert facts["stub_import_root"] == str(target)  # what the reference model's stub gets on its path
    assert facts["bare"] == []
    assert facts["helpers"] == sorted(helper_files(MODELS_DIR / "preprocessing.py"))  # same copy as a checkout's
    r = _isolated_python(tmp_path, target, ["-c", "import builders"])
    assert r.returncode != 0 and "ModuleNotFoundError: No module named 'builders'" in r.stderr
    r = _isolated_python(tmp_path, target, ["-m", "enginesmith.builders.cli", "--version"])
    assert r.returncode == 0 and r.stdout == f"enginesmith {_pyproject_version()}\n", r.stderr


def test_a_checkout_imports_its_folders_through_the_import_root():
    import enginesmith
    import enginesmith.runtime

    assert enginesmith.__path__ == [str(REPO_ROOT / "enginesmith"), str(REPO_ROOT)]
    assert Path(enginesmith.runtime.__file__) == REPO_ROOT / "runtime" / "__init__.py"
    assert enginesmith.__version__ == _pyproject_version()
    assert not set(PACKAGES) & sys.modules.keys()


@pytest.mark.parametrize("name", PACKAGES)
def test_a_bare_package_name_is_refused_with_the_import_to_use(name):
    r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert f"ImportError: import enginesmith.{name}, not {name}:" in r.stderr.splitlines()[-1]
