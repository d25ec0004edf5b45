"""`enginesmith convert` against a Hub on 127.0.0.1 (tests/fake_hub.py), through the installed huggingface_hub's
own HTTP calls: what a missing, gated, too large or cached repository gives, as one line and an exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_hub import COMMIT, FakeHub
from tests.support import REPO_ROOT, tiny_hf_model


@pytest.fixture(scope="module")
def hub():
    with FakeHub(tiny_hf_model("llama")) as h:
        yield h


def convert(tmp_path: Path, source: str, endpoint: str, token: str | None = None,
            spec: str | None = None) -> subprocess.CompletedProcess:
    """`convert` of a tiny recipe whose model.source is `source`, run from `tmp_path` with its own HF cache. With
    `spec` (a shipped spec) the plan needs no config.json from the Hub: the download asks it first."""
    recipe = tmp_path / "r.yaml"
    spec_field = f", spec: {spec}" if spec else ""
    recipe.write_text(f"name: tiny\nmodel: {{source: {source}, dtype: float32{spec_field}}}\nhardware: {{gpu: H100}}\n"
                      "parallel: {tp_size: 1}\nbuild: {target: reference, max_input_len: 256, max_seq_len: 512}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(REPO_ROOT),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "enginesmith.builders.cli", "convert", str(recipe), "--out",
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), r.stderr
    return lines[-1]


@pytest.mark.parametrize("spec", [None, "tiny-llama"])
def test_a_missing_relative_path_shaped_like_a_repo_id(tmp_path, hub, spec):
    """A fresh clone has no out/: `out/tiny-llama-hf` is asked of the Hub, which has no such repo; the answer
    says so and names the local folder that is missing too (not 'check the network and HF_TOKEN')."""
    r = convert(tmp_path, "out/tiny-llama-hf", hub.url, spec=spec)
    assert r.returncode == 1
    assert error_line(r) == (f"error: model.source='out/tiny-llama-hf': no Hub repo out/tiny-llama-hf (a private "
                             f"one needs HF_TOKEN), and no local folder {tmp_path / 'out' / 'tiny-llama-hf'} either "
                             f"(resolved relative to the current directory {tmp_path}, not the recipe's folder); "
                             "fix the repo id or the path")


@pytest.mark.parametrize("token,spec", [(None, None), ("hf_test", None), (None, "tiny-llama")])
def test_a_gated_repository(tmp_path, hub, token, spec):
    r = convert(tmp_path, "gated/llama", hub.url, token, spec)
    assert r.returncode == 1
    who = "HF_TOKEN is not set" if token is None else "the token in use has no access to it yet"
    assert error_line(r) == (f"error: gated/llama is a gated repository ({who}): request access on "
                             "https://huggingface.co/gated/llama (accept its terms while logged in), then set "
                             "HF_TOKEN to a token of that account")


def test_free_space_is_checked_before_downloading_and_cached_files_do_not_count(tmp_path, hub):
    import shutil

    weights = "model.safetensors"
    hub.claimed_sizes = {weights: 2 * shutil.disk_usage(tmp_path).free + 10**9}
    try:
        hub.requests.clear()
        r = convert(tmp_path, "big/llama", hub.url)
        assert r.returncode == 1
        line = error_line(r)
        assert line.startswith(f"error: big/llama@{COMMIT[:12]} needs ") and "file(s) not in the cache yet" in line
        assert f"and {tmp_path}" in line and "HF_HUB_CACHE" in line
        assert not [q for q in hub.requests if q.startswith("GET") and q.endswith(weights)]  # not downloaded

        hub.claimed_sizes = {}
        r = convert(tmp_path, "big/llama", hub.url)
        assert r.returncode == 0, r.stderr
        hf = tmp_path / "out" / "tiny" / "hf"
        assert hf.resolve().name == COMMIT and (hf / weights).is_file()  # pinned to the listed commit

        hub.claimed_sizes = {weights: 2 * shutil.disk_usage(tmp_path).free + 10**9}  # now in the cache
        r = convert(tmp_path, "big/llama", hub.url)
        assert r.returncode == 0, r.stderr
    finally:
        hub.claimed_sizes = {}
