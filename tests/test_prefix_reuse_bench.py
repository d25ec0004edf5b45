"""benchmarks/prefix_reuse.py on the CPU: in-process engines and the served path, reuse off vs on.

Only what must hold anywhere is checked (the same greedy outputs, the prefix found in the cache, files written);
the speedups are measured numbers the results file reports, not asserted here.
"""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks.prefix_reuse import main
from tests.support import REPO_ROOT, tiny_hf_model

SMALL = ["--system", "48", "--unique", "8", "--osl", "4", "--requests", "4", "--repeats", "1",
         "--tokens-per-block", "16"]


def _check(results: dict, concurrency: int = 4) -> None:
    shared, unique = results["shared"], results["unique"]
    assert shared["outputs_match"] == unique["outputs_match"] == 1.0
    assert shared["off"]["hit_rate"] is None and shared["off"]["reused_blocks"] == 0  # reuse off: no lookups
    # 56-token prompts: 4 blocks of 16, of which 3 hold the 48-token system prompt
    assert shared["on"]["reused_blocks"] >= 3 and shared["on"]["hit_rate"] > 0
    assert unique["on"]["reused_blocks"] == 0 and unique["on"]["missed_blocks"] == 4 * 4
    assert shared["ttft_p50_speedup"] > 0 and unique["throughput_ratio"] > 0
    assert results["workload"] == dict(system_tokens=48, unique_tokens=8, osl=4, requests=4, concurrency=concurrency,
                                       tokens_per_block=16, repeats=1)


def test_in_process_tiny_run_writes_results_and_plot(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--device", "cpu", "--tiny", *SMALL, "--out-file", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["mode"] == "in-process" and results["model"]["dtype"] == "float32"
    _check(results)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny recipe converted and built into <out>/tiny-llama: (recipe path, out root, engine root)."""
    from enginesmith.builders.build.reference import build_reference
    from enginesmith.builders.convert import convert_checkpoint
    from enginesmith.builders.model_spec import ModelSpec
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("prefix-reuse")
    hf = tiny_hf_model("llama")
    data = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-llama.yaml").read_text())
    data["model"]["source"] = str(hf)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    plan = make_plan(recipe, with_options=False)
    root = tmp / "out" / recipe.name
    convert_checkpoint(hf, root / "checkpoint", plan.mapping, ModelSpec.from_pretrained_dir(hf), "float32", "none",
                       workers=1)
    build_reference(recipe, plan, root / "checkpoint", root / "engine")
    return path, tmp / "out", root


def test_in_process_run_of_a_built_engine_dir(built, tmp_path):
    _, _, root = built
    out = tmp_path / "r.json"
    # one at a time: max_num_tokens 1024 lets 4 prompts share one step, where none finds another's blocks
    assert main(["--engine-dir", str(root / "engine"), "--device", "cpu", *SMALL, "--concurrency", "1",
                 "--out-file", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["model"]["engine_dir"] == str(root / "engine")
    _check(results, concurrency=1)


@pytest.mark.server
@pytest.mark.timeout(600)
def test_served_run_serves_the_recipes_engine_with_reuse_off_then_on(built, tmp_path):
    path, out_root, root = built
    out = tmp_path / "served.json"
    assert main(["--served", str(path), "--out", str(out_root), *SMALL, "--concurrency", "1",
                 "--out-file", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["mode"] == "served"
    _check(results, concurrency=1)
    for label in ("off", "on"):
        assert (root / "prefix-reuse" / label / "repo" / "manifest.json").is_file()
