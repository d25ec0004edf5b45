"""`enginesmith build`: --dry-run / --explain from the plan alone, and the stop without TensorRT-LLM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from typer.testing import CliRunner

from enginesmith.builders.cli import app
from tests.test_build_flags import GOLDEN

REPO = Path(__file__).resolve().parents[1]
RECIPE_70B = str(REPO / "recipes" / "llama3-70b-tp2-pp2.yaml")
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["build", *args], catch_exceptions=False)


def test_dry_run_prints_the_exact_command_and_where_the_checkpoint_would_be():
    r = _run(RECIPE_70B, "--out", "out", "--dry-run")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert GOLDEN["llama3-70b-tp2-pp2.yaml"] in lines
    assert "; tp_size=2 pp_size=2 over 2 node(s)" in lines[0]  # a dense model has no moe_ep/moe_tp split
    assert "# checkpoint: out/llama3-70b-tp2-pp2/checkpoint (not converted yet: `enginesmith convert" \
           in r.stdout
    assert (f"#     node 1: enginesmith convert {RECIPE_70B} --ranks 2,3 && enginesmith build {RECIPE_70B} --ranks 2,3"
            f" && enginesmith repo {RECIPE_70B} --ranks 2,3") in lines
    golden = GOLDEN["llama3-70b-tp2-pp2.yaml"]
    runs = f"#       (build runs: python -m enginesmith.builders.build.trtllm_engine --ranks 2,3 -- {golden})"
    assert runs in lines
    assert any("shared filesystem: node 0 runs convert, build and repo for all ranks" in line for line in lines)
    assert f"#   then on node 0: enginesmith serve {RECIPE_70B} --hosts NODE0,NODE1,...  (add --ranks 0,1 with " \
           "per-node directories)" in lines
    assert "# trtllm-build choices" not in r.stdout


def test_explain_gives_a_reason_per_choice():
    r = _run(RECIPE_70B, "--dry-run", "--explain")
    assert r.exit_code == 0, r.output
    reduce = [line for line in r.stdout.splitlines() if line.startswith("#   --reduce_fusion")]
    assert reduce and "pp_size=2" in reduce[0] and "disable" in reduce[0]
    assert any(line.startswith("#   --moe_plugin") and "(left out)" in line for line in r.stdout.splitlines())


def test_ranks_dry_run_prints_the_node_command():
    r = _run(RECIPE_70B, "--dry-run", "--ranks", "2,3")
    assert r.exit_code == 0, r.output
    golden = GOLDEN["llama3-70b-tp2-pp2.yaml"]
    assert f"python -m enginesmith.builders.build.trtllm_engine --ranks 2,3 -- {golden}" in r.stdout


def test_bad_ranks_are_refused_naming_the_valid_range():
    r = _run(RECIPE_70B, "--dry-run", "--ranks", "7")
    assert r.exit_code == 1 and "ranks must lie in 0..3" in r.stderr


def test_without_trtllm_the_build_prints_the_commands_then_stops_with_install_help():
    assert importlib.util.find_spec("tensorrt_llm") is None, "this test describes a machine without TensorRT-LLM"
    r = _run(str(REPO / "recipes" / "llama2-13b-tp2-24gb.yaml"), "--out", "out")
    assert r.exit_code == 3
    assert GOLDEN["llama2-13b-tp2-24gb.yaml"] in r.stdout.splitlines()
    assert "pip install tensorrt-llm==1.2.1 --extra-index-url https://pypi.nvidia.com" in r.stderr
    assert "NGC" in r.stderr and "--dry-run" in r.stderr


def test_llmapi_dry_run_prints_both_files_and_the_serve_command():
    r = _run(str(REPO / "recipes" / "kimi-k2-16xa100.yaml"), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "# ---- out/kimi-k2-16xa100/engine/llm_api_options.yaml" in r.stdout
    assert "triton_config:" in r.stdout
    assert "trtllm-serve moonshotai/Kimi-K2-Instruct --config out/kimi-k2-16xa100/engine/llm_api_options.yaml" \
           in r.stdout


def test_reference_build_then_up_to_date(tmp_path):
    from enginesmith.builders.convert import convert_checkpoint
    from enginesmith.builders.model_spec import ModelSpec
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe
    from tests.support import tiny_hf_model

    recipe_path = REPO / "recipes" / "tiny-llama.yaml"
    recipe = load_recipe(recipe_path)
    hf = tiny_hf_model("llama")
    convert_checkpoint(hf, tmp_path / recipe.name / "checkpoint", make_plan(recipe).mapping,
                       ModelSpec.from_pretrained_dir(hf), "float32", "none", workers=1, progress=False)
    first = _run(str(recipe_path), "--out", str(tmp_path))
    assert first.exit_code == 0 and "reference: built engine_config.json" in first.stdout
    second = _run(str(recipe_path), "--out", str(tmp_path))
    assert second.exit_code == 0 and "up to date" in second.stdout


def test_ranks_on_a_target_without_engines_is_refused():
    r = _run(str(REPO / "recipes" / "tiny-llama.yaml"), "--dry-run", "--ranks", "0")
    assert r.exit_code == 1 and "--ranks/--workers apply to build.target trtllm-engine only" in r.stderr
