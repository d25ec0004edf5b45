"""Reference target on a really converted tiny checkpoint: validation, engine_config.json, cache behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enginesmith.builders.build.cache import EngineManifest
from enginesmith.builders.build.checkpoint import CheckpointError
from enginesmith.builders.build.llmapi import MODEL_YAML, OPTIONS_FILE
from enginesmith.builders.build.reference import ENGINE_CONFIG
from enginesmith.builders.build.stage import StageDirs, run_build_stage
from enginesmith.builders.convert import convert_checkpoint
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.planner.plan import make_plan
from enginesmith.builders.recipe import load_recipe
from tests.support import tiny_hf_model

REPO = Path(__file__).resolve().parents[1]


def _recipe(**sections):
    recipe = load_recipe(REPO / "recipes" / "tiny-llama.yaml")
    return recipe.model_copy(update={k: getattr(recipe, k).model_copy(update=v) for k, v in sections.items()})


@pytest.fixture()
def converted(tmp_path):
    """(out, recipe, plan) with the tiny Llama converted at tp_size=2 into out/<name>/checkpoint."""
    recipe = _recipe(parallel={"tp_size": 2})
    plan = make_plan(recipe)
    hf = tiny_hf_model("llama")
    convert_checkpoint(hf, StageDirs.of(tmp_path, recipe.name).checkpoint, plan.mapping,
                       ModelSpec.from_pretrained_dir(hf), "float32", "none", workers=1, progress=False)
    return tmp_path, recipe, plan


def test_first_build_writes_engine_config_and_manifest(converted):
    out, recipe, plan = converted
    result = run_build_stage(recipe, plan, out)
    dirs = StageDirs.of(out, recipe.name)
    assert not result.skipped and result.built == [ENGINE_CONFIG]
    config = json.loads((dirs.engine / ENGINE_CONFIG).read_text())
    assert config == {"target": "reference", "checkpoint_dir": str(dirs.checkpoint.resolve()),
                      "max_batch_size": 16, "max_input_len": 256, "max_seq_len": 512, "max_num_tokens": 1024,
                      "max_beam_width": 1, "tokens_per_block": 16, "dtype": "float32",
                      "pp_micro_batches": plan.pipeline.micro_batches}
    manifest = EngineManifest.read(dirs.engine)
    assert manifest.target == "reference" and manifest.key and set(manifest.outputs) == {ENGINE_CONFIG}
    assert "serve.*" in manifest.ignored_factors


def test_engine_dir_loads_in_the_reference_runtime(converted):
    from enginesmith.runtime.engine.engine_config import read_engine_dir

    out, recipe, plan = converted
    run_build_stage(recipe, plan, out)
    config, ckpt = read_engine_dir(StageDirs.of(out, recipe.name).engine)
    assert (config.max_batch_size, config.tokens_per_block, config.dtype) == (16, 16, "float32")
    assert ckpt == StageDirs.of(out, recipe.name).checkpoint.resolve()


def test_second_build_is_a_no_op_and_ignored_factors_do_not_rebuild(converted):
    out, recipe, plan = converted
    run_build_stage(recipe, plan, out)
    path = StageDirs.of(out, recipe.name).engine / ENGINE_CONFIG
    before = path.stat().st_mtime_ns
    assert run_build_stage(recipe, plan, out).skipped
    serve_changed = _recipe(parallel={"tp_size": 2}, serve={"kv_cache_free_gpu_mem_fraction": 0.3})
    assert run_build_stage(serve_changed, plan, out).skipped
    assert path.stat().st_mtime_ns == before


def test_changed_option_rebuilds_and_says_what_changed(converted):
    out, recipe, plan = converted
    run_build_stage(recipe, plan, out)
    bigger = _recipe(parallel={"tp_size": 2}, build={"max_batch_size": 8})
    result = run_build_stage(bigger, plan, out)
    assert not result.skipped and result.changed == ["engine_config"]
    assert json.loads((result.engine_dir / ENGINE_CONFIG).read_text())["max_batch_size"] == 8
    assert run_build_stage(bigger, plan, out).skipped


def test_reconverted_checkpoint_rebuilds(converted):
    out, recipe, plan = converted
    run_build_stage(recipe, plan, out)
    ckpt = StageDirs.of(out, recipe.name).checkpoint
    hf = tiny_hf_model("llama")
    convert_checkpoint(hf, ckpt, plan.mapping, ModelSpec.from_pretrained_dir(hf), "bfloat16", "none",
                       workers=1, progress=False)
    result = run_build_stage(recipe, plan, out)
    assert not result.skipped and result.changed == ["checkpoint"]


def test_altered_rank_file_is_refused(converted):
    out, recipe, plan = converted
    rank1 = StageDirs.of(out, recipe.name).checkpoint / "rank1.safetensors"
    data = bytearray(rank1.read_bytes())
    data[-1] ^= 0xFF
    rank1.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank1\.safetensors missing or changed since conversion"):
        run_build_stage(recipe, plan, out)


def test_checkpoint_of_another_layout_is_refused(converted):
    out, recipe, _ = converted
    tp1 = _recipe()
    with pytest.raises(CheckpointError, match=r"tp_size=2 \(plan: 1\)"):
        run_build_stage(tp1, make_plan(tp1), out)


def test_missing_checkpoint_says_to_convert(tmp_path):
    recipe = _recipe()
    with pytest.raises(CheckpointError, match="enginesmith convert RECIPE"):
        run_build_stage(recipe, make_plan(recipe), tmp_path)


def test_switching_target_replaces_the_old_outputs(converted):
    out, recipe, plan = converted
    run_build_stage(recipe, plan, out)
    llmapi = _recipe(parallel={"tp_size": 2}, build={"target": "trtllm-llmapi"})
    result = run_build_stage(llmapi, plan, out)
    files = sorted(p.name for p in result.engine_dir.iterdir())
    assert files == sorted([MODEL_YAML, OPTIONS_FILE, "manifest.json"])
    assert EngineManifest.read(result.engine_dir).target == "trtllm-llmapi"
