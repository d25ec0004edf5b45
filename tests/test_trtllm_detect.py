"""The TensorRT-LLM a container provides: found beside the venv, reported, and the version guard reads it.

A stand-in `tensorrt_llm` package (metadata + version.py only, nothing runs) and a stand-in `trtllm-build`
on PATH play the container's installation; no build is faked.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from enginesmith.builders.build.cache import EngineManifest
from enginesmith.builders.build.engine_check import (EngineCompatibilityError, check_engine_compatible,
                                                     installed_trtllm_version)
from enginesmith.builders.build.trtllm_engine import PINNED_VERSION, TensorRTLLMUnavailable, require_trtllm
from enginesmith.builders.cli import app

REPO = Path(__file__).resolve().parents[1]
RECIPE_13B = str(REPO / "recipes" / "llama2-13b-tp2-24gb.yaml")


def fake_trtllm(root: Path, version: str, metadata: bool = True) -> Path:
    """A `tensorrt_llm` package on `root` (what `pip show` and `find_spec` see; it cannot be imported usefully)."""
    pkg = root / "tensorrt_llm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('stand-in: enginesmith must not import it')\n")
    (pkg / "version.py").write_text(f'__version__ = "{version}"\n')
    if metadata:
        info = root / f"tensorrt_llm-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {version}\n")
    return root


@pytest.fixture()
def on_path(monkeypatch):
    def add(root: Path):
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
    yield add
    importlib.invalidate_caches()


def test_nothing_installed_here():
    assert installed_trtllm_version() is None


@pytest.mark.parametrize("metadata", [True, False], ids=["dist-metadata", "version.py"])
def test_the_installed_version_is_read_without_importing_it(tmp_path, on_path, metadata):
    on_path(fake_trtllm(tmp_path, "1.2.0", metadata))
    assert installed_trtllm_version() == "1.2.0"
    assert "tensorrt_llm" not in sys.modules


def _built(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    EngineManifest(target="trtllm-engine", trtllm_version=PINNED_VERSION, gpu_compute_capability="9.0",
                   gpu_name="NVIDIA H100 80GB HBM3").write(d)
    return d


def test_guard_compares_with_the_installed_version_not_the_pin(tmp_path, on_path):
    engine = _built(tmp_path / "engine")
    with pytest.raises(EngineCompatibilityError, match="no TensorRT-LLM to serve it"):
        check_engine_compatible(engine, gpu_compute_capability="9.0")  # the pin is 1.2.1, the engine's too
    on_path(fake_trtllm(tmp_path / "site", "1.2.0"))
    with pytest.raises(EngineCompatibilityError) as e:
        check_engine_compatible(engine, gpu_compute_capability="9.0")
    assert "built with TensorRT-LLM 1.2.1" in str(e.value) and "TensorRT-LLM 1.2.0" in str(e.value)


def test_guard_passes_with_the_same_installed_version(tmp_path, on_path):
    on_path(fake_trtllm(tmp_path / "site", PINNED_VERSION))
    assert check_engine_compatible(_built(tmp_path / "engine"), gpu_compute_capability="9.0").target \
        == "trtllm-engine"


def trtllm_build_on_path(monkeypatch, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tool = d / "trtllm-build"
    tool.write_text("#!/bin/sh\necho stand-in >&2\nexit 99\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    return tool


def test_trtllm_build_on_path_without_the_package_says_the_venv_hides_it(tmp_path, monkeypatch):
    tool = trtllm_build_on_path(monkeypatch, tmp_path / "bin")
    with pytest.raises(TensorRTLLMUnavailable) as e:
        require_trtllm()
    assert f"`trtllm-build` is on PATH ({tool})" in str(e.value) and "make venv" in str(e.value)


def test_package_and_tool_found_pass_and_build_reports_the_version(tmp_path, monkeypatch, on_path):
    on_path(fake_trtllm(tmp_path / "site", "1.2.0"))
    tool = trtllm_build_on_path(monkeypatch, tmp_path / "bin")
    require_trtllm()  # no error
    r = CliRunner().invoke(app, ["build", RECIPE_13B, "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = [x for x in r.stdout.splitlines() if x.startswith("# TensorRT-LLM ")][0]
    assert line == (f"# TensorRT-LLM 1.2.0 found ({(tmp_path / 'site' / 'tensorrt_llm').resolve()}; {tool}); "
                    f"the engine target is pinned to {PINNED_VERSION}")


def test_repo_of_an_engine_needs_the_serving_trtllm(tmp_path, on_path):
    """`enginesmith repo` of a built engine checks the TensorRT-LLM here, never the pin."""
    from tests.test_repository import engine_recipe, trtllm_engine, write

    from enginesmith.builders.tiny_model import make_tokenizer
    from enginesmith.triton_repo.repository import RepoError

    tok = tmp_path / "tok"
    make_tokenizer(tok)
    engine = trtllm_engine(tmp_path / "engine", manifest={"trtllm_version": PINNED_VERSION,
                                                         "gpu_compute_capability": "9.0"})
    with pytest.raises(RepoError, match="no TensorRT-LLM to serve it"):
        write(engine_recipe(), engine, tok, tmp_path / "repo")
    on_path(fake_trtllm(tmp_path / "site", PINNED_VERSION))
    m = write(engine_recipe(), engine, tok, tmp_path / "repo")
    assert m.tensorrt_llm_backend == "tensorrtllm"
    assert json.loads((tmp_path / "repo" / "manifest.json").read_text())["target"] == "trtllm-engine"


def test_make_venv_over_a_container_python_finds_and_uses_its_trtllm(tmp_path):
    """The container's case end to end: a Python holding torch and TensorRT-LLM, trtllm-build on PATH. `make venv`
    over it installs neither, reports the TensorRT-LLM it found, and build passes the TensorRT-LLM check (it stops
    at the missing checkpoint, exit 1, instead of exit 3 "not installed")."""
    from tests.container_rehearsal import base_python, run

    site_dir = fake_trtllm(tmp_path / "container-site", PINNED_VERSION)
    base = base_python(tmp_path, extra=(site_dir,))
    tool_dir = tmp_path / "container-bin"
    tool_dir.mkdir()
    (tool_dir / "trtllm-build").write_text("#!/bin/sh\necho stand-in >&2\nexit 99\n")
    (tool_dir / "trtllm-build").chmod(0o755)
    env = {**os.environ, "PATH": f"{tool_dir}{os.pathsep}{os.environ['PATH']}"}
    venv = tmp_path / "venv"
    said = run(["make", "--no-print-directory", "venv", f"VENV={venv}", f"PYTHON={base}",
                "PIP_FLAGS=--no-index --no-build-isolation"], env=env)
    assert f"TensorRT-LLM {PINNED_VERSION} ({site_dir / 'tensorrt_llm'})" in said.splitlines()
    assert f"tensorrt-llm=={PINNED_VERSION}" in (venv / "base-constraints.txt").read_text().splitlines()
    assert not list(venv.glob("lib/python*/site-packages/torch"))
    es = [venv / "bin" / "python", "-m", "enginesmith.builders.cli", "build", RECIPE_13B, "--out", tmp_path / "out"]
    dry = run([*es, "--dry-run"], env=env)
    assert f"# TensorRT-LLM {PINNED_VERSION} found ({site_dir / 'tensorrt_llm'}; {tool_dir / 'trtllm-build'})" \
        in dry.splitlines()
    proc = subprocess.run([str(a) for a in es], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "the checkpoint is missing or unfinished" in proc.stderr, proc.stderr
