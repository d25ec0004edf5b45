"""LLM-API target: the options YAML and the Triton llmapi model.yaml, keys checked against upstream's model.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from enginesmith.builders.build.llmapi import (
    KV_CACHE_CONFIG_KEYS,
    LLMAPI_KEYS,
    MODEL_YAML,
    OPTIONS_FILE,
    TRITON_CONFIG_KEYS,
    build_llmapi,
    llmapi_files,
)
from enginesmith.builders.planner.plan import make_plan
from enginesmith.builders.recipe import load_recipe
from tests.test_build_flags import RECIPES, _reference_dir, _variant

REPO = Path(__file__).resolve().parents[1]
# Newest engine-era template (TensorRT-LLM triton_backend) and the May-2025 tensorrtllm_backend copy.
UPSTREAM = ("TensorRT-LLM-triton_backend/all_models/llmapi/tensorrt_llm/1/model.yaml",
            "tensorrtllm_backend-c2e65b8/llmapi/tensorrt_llm/model.yaml")
# Dropped upstream after May 2025 (SOURCES.md: the newer model.yaml is the old one minus this block).
DROPPED_UPSTREAM = {"pytorch_backend_config"}


def upstream_model_yaml(rel: str) -> dict:
    path = _reference_dir() / "upstream-templates" / rel
    if not path.is_file():
        pytest.fail(f"upstream model.yaml not found at {path}; set ENGINESMITH_REFERENCE_DIR")
    return yaml.safe_load(path.read_text())


def _files(recipe, tmp_path) -> dict[str, dict]:
    texts = llmapi_files(recipe, make_plan(recipe), tmp_path / "hf")
    return {name: yaml.safe_load(text) for name, text in texts.items()}


@pytest.mark.parametrize("rel", UPSTREAM)
@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_model_yaml_has_upstreams_keys_and_types(recipe_path, rel, tmp_path):
    upstream = upstream_model_yaml(rel)
    ours = _files(load_recipe(recipe_path), tmp_path)[MODEL_YAML]
    for key, value in upstream.items():
        if key in DROPPED_UPSTREAM:
            assert key not in ours
            continue
        assert key in ours, f"upstream model.yaml key {key!r} missing"
        assert type(ours[key]) is type(value), (key, ours[key], value)
    assert set(ours["triton_config"]) == set(upstream["triton_config"]) == TRITON_CONFIG_KEYS
    assert ours["backend"] == upstream["backend"] == "pytorch"
    assert set(ours) - {"triton_config"} <= LLMAPI_KEYS


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_options_follow_the_plan_and_recipe(recipe_path, tmp_path):
    recipe = load_recipe(recipe_path)
    plan = make_plan(recipe)
    files = _files(recipe, tmp_path)
    opts, model_yaml = files[OPTIONS_FILE], files[MODEL_YAML]
    assert opts == {k: v for k, v in model_yaml.items() if k not in ("model", "backend", "revision", "triton_config")}
    assert set(opts) <= LLMAPI_KEYS - {"model", "backend", "revision"}
    assert set(opts["kv_cache_config"]) <= KV_CACHE_CONFIG_KEYS
    m = plan.mapping
    assert (opts["tensor_parallel_size"], opts["pipeline_parallel_size"]) == (m.tp_size, m.pp_size)
    assert opts.get("moe_expert_parallel_size") == (m.moe_ep_size if plan.spec.is_moe else None)
    assert opts["kv_cache_config"]["free_gpu_memory_fraction"] == recipe.serve.kv_cache_free_gpu_mem_fraction
    assert opts["kv_cache_config"]["tokens_per_block"] == recipe.build.tokens_per_block
    assert opts["max_batch_size"] == recipe.build.max_batch_size
    assert model_yaml["triton_config"]["decoupled"] == recipe.serve.decoupled
    assert model_yaml["model"] == recipe.model.source  # not downloaded: the recipe's source


GOLDEN_70B_OPTIONS = """\
# LLM-API options of recipe llama3-70b-tp2-pp2: trtllm-serve MODEL --config llm_api_options.yaml
# Written by `enginesmith build`.
tensor_parallel_size: 2
pipeline_parallel_size: 2
gpus_per_node: 2
dtype: bfloat16
trust_remote_code: false
max_batch_size: 64
max_num_tokens: 8192
max_seq_len: 8192
max_input_len: 4096
max_beam_width: 1
enable_chunked_prefill: true
kv_cache_config:
  free_gpu_memory_fraction: 0.9
  enable_block_reuse: false
  tokens_per_block: 32
  dtype: auto
scheduler_config:
  capacity_scheduler_policy: GUARANTEED_NO_EVICT
"""


def test_golden_options_of_the_70b_recipe(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "llama3-70b-tp2-pp2.yaml")
    assert llmapi_files(recipe, make_plan(recipe), tmp_path / "hf")[OPTIONS_FILE] == GOLDEN_70B_OPTIONS


def llm_args_table() -> dict[str, set[str]]:
    """Class -> field names of TensorRT-LLM 1.2's LLM-API arguments (tests/data/trtllm-llmapi-args/)."""
    table: dict[str, set[str]] = {}
    for line in (REPO / "tests" / "data" / "trtllm-llmapi-args" / "llm_args-1.2.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            cls, name = line.split("\t")
            table.setdefault(cls, set()).add(name)
    return table


VARIANTS = [
    ("kimi-k2-16xa100.yaml", {}),
    ("llama3-70b-tp2-pp2.yaml", {"quantization": {"weights": "fp8", "kv_cache": "fp8"},
                                 "serve": {"batch_scheduler_policy": "max_utilization"}}),
    ("llama2-13b-tp2-24gb.yaml", {"quantization": {"weights": "int8_weight_only", "kv_cache": "none"}}),
    ("mixtral-8x22b-16xa100.yaml", {"model": {"trust_remote_code": True}}),
]


@pytest.mark.parametrize("name,changes", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_key_is_a_pytorch_backend_argument_of_trtllm_1_2(name, changes, tmp_path):
    table = llm_args_table()
    torch_args = table["BaseLlmArgs"] | table["TorchLlmArgs"]
    assert LLMAPI_KEYS <= torch_args and KV_CACHE_CONFIG_KEYS <= table["KvCacheConfig"]
    # quant_config is an argument of the TensorRT backend only (TorchLlmArgs reads the checkpoint's own).
    assert "quant_config" in table["TrtLlmArgs"] and "quant_config" not in torch_args
    recipe = _variant(name, **changes) if changes else load_recipe(REPO / "recipes" / name)
    files = _files(recipe, tmp_path)
    for fname in (OPTIONS_FILE, MODEL_YAML):
        doc = {k: v for k, v in files[fname].items() if k != "triton_config"}
        assert set(doc) <= torch_args, (fname, set(doc) - torch_args)
        assert set(doc["kv_cache_config"]) <= table["KvCacheConfig"]
        assert set(doc["scheduler_config"]) <= table["SchedulerConfig"]
    assert files[MODEL_YAML]["backend"] == "pytorch"


def test_quantized_recipes_need_a_prequantized_checkpoint_and_names_are_trtllms(tmp_path):
    recipe = _variant("llama3-70b-tp2-pp2.yaml", quantization={"weights": "fp8", "kv_cache": "fp8"},
                      serve={"batch_scheduler_policy": "max_utilization", "enable_kv_cache_reuse": True})
    texts = llmapi_files(recipe, make_plan(recipe), tmp_path / "hf")
    opts = yaml.safe_load(texts[OPTIONS_FILE])
    assert "quant_config" not in opts
    assert opts["kv_cache_config"]["dtype"] == "fp8" and opts["kv_cache_config"]["enable_block_reuse"] is True
    assert opts["scheduler_config"] == {"capacity_scheduler_policy": "MAX_UTILIZATION"}
    for text in texts.values():
        assert "model.source must be a checkpoint already quantized to FP8" in text
    plain = load_recipe(REPO / "recipes" / "llama3-70b-tp2-pp2.yaml")
    assert "quantized" not in llmapi_files(plain, make_plan(plain), tmp_path / "hf")[OPTIONS_FILE]


def test_downloaded_snapshot_is_the_model_path(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "llama2-13b-tp2-24gb.yaml")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    model_yaml = _files(recipe, tmp_path)[MODEL_YAML]
    assert model_yaml["model"] == str((tmp_path / "hf").resolve()) and "revision" not in model_yaml


def test_llmapi_build_is_cached(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "kimi-k2-16xa100.yaml")
    plan = make_plan(recipe)
    engine = tmp_path / "engine"
    first = build_llmapi(recipe, plan, tmp_path / "hf", engine)
    assert not first.skipped and sorted(first.built) == [OPTIONS_FILE, MODEL_YAML]
    mtime = (engine / MODEL_YAML).stat().st_mtime_ns
    assert build_llmapi(recipe, plan, tmp_path / "hf", engine).skipped
    assert (engine / MODEL_YAML).stat().st_mtime_ns == mtime
    changed = _variant("kimi-k2-16xa100.yaml", serve={"kv_cache_free_gpu_mem_fraction": 0.8})
    again = build_llmapi(changed, plan, tmp_path / "hf", engine)
    assert not again.skipped and again.changed == ["options"]
    assert yaml.safe_load((engine / OPTIONS_FILE).read_text())["kv_cache_config"]["free_gpu_memory_fraction"] == 0.8
