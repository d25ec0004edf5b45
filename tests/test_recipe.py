"""Recipe schema: every field's validation message names its path and the fix; shipped recipes load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from enginesmith.builders.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from enginesmith.builders.recipe_errors import _model_of

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))
BASE = {"name": "t", "model": {"source": "org/model"}}

# One bad value per field, and the message it must produce (path first, then what is wrong / the fix).
FIELD_ERRORS: dict[str, tuple[object, str]] = {
    "name": ("bad name!", "name: String should match pattern"),
    "model.source": ("", "model.source: String should have at least 1 character"),
    "model.revision": (5, "model.revision: Input should be a valid string"),
    "model.dtype": ("fp64", "model.dtype: Input should be 'float32', 'float16' or 'bfloat16' (got 'fp64')"),
    "model.trust_remote_code": ("maybe", "model.trust_remote_code: Input should be a valid boolean"),
    "model.spec": ("nope", "model.spec: 'nope' is not a shipped spec; use one of deepseek-v3, kimi-k2"),
    "hardware.gpu": ("B300", "hardware.gpu: Input should be 'A100-40', 'A100-80', 'H100'"),
    "hardware.memory_gb": (-1, "hardware.memory_gb: Input should be greater than 0 (got -1)"),
    "hardware.hbm_gbps": (0, "hardware.hbm_gbps: Input should be greater than 0 (got 0)"),
    "hardware.tflops": ({"bfloat16": -3}, "hardware.tflops.bfloat16: Input should be greater than 0 (got -3)"),
    "hardware.fp8": ("sometimes", "hardware.fp8: Input should be a valid boolean"),
    "hardware.compute_capability": (7, "hardware.compute_capability: Input should be greater than or equal to 60"),
    "hardware.gpus_per_node": (0, "hardware.gpus_per_node: Input should be greater than or equal to 1 (got 0)"),
    "hardware.nodes": (0, "hardware.nodes: Input should be greater than or equal to 1 (got 0)"),
    "hardware.intra_node_link": ("ib", "hardware.intra_node_link: Input should be 'nvlink' or 'pcie'"),
    "hardware.intra_node_gbps": (0, "hardware.intra_node_gbps: Input should be greater than 0"),
    "hardware.inter_node_link": ("nvlink", "hardware.inter_node_link: Input should be 'infiniband' or 'ethernet'"),
    "hardware.inter_node_gbps": (-5, "hardware.inter_node_gbps: Input should be greater than 0"),
    "parallel.tp_size": (0, "parallel.tp_size: Input should be greater than or equal to 1 (got 0)"),
    "parallel.pp_size": (0, "parallel.pp_size: Input should be greater than or equal to 1 (got 0)"),
    "parallel.moe_ep_size": (0, "parallel.moe_ep_size: Input should be greater than or equal to 1"),
    "parallel.moe_tp_size": (0, "parallel.moe_tp_size: Input should be greater than or equal to 1"),
    "parallel.pp_micro_batches": (0, "parallel.pp_micro_batches: Input should be greater than or equal to 1"),
    "quantization.weights": ("int2", "quantization.weights: Input should be 'none', 'fp8', 'int8_weight_only' or "
                                     "'int4_weight_only'"),
    "quantization.kv_cache": ("int8", "quantization.kv_cache: Input should be 'none' or 'fp8'"),
    "build.target": ("tensorrt", "build.target: Input should be 'trtllm-engine', 'trtllm-llmapi' or 'reference'"),
    "build.max_batch_size": (0, "build.max_batch_size: Input should be greater than or equal to 1"),
    "build.max_input_len": (0, "build.max_input_len: Input should be greater than or equal to 1"),
    "build.max_seq_len": (1, "build.max_seq_len: Input should be greater than or equal to 2"),
    "build.max_num_tokens": (0, "build.max_num_tokens: Input should be greater than or equal to 1"),
    "build.max_beam_width": (0, "build.max_beam_width: Input should be greater than or equal to 1"),
    "build.tokens_per_block": (24, "build.tokens_per_block: 24 is not a power of two; use 16 or 32"),
    "serve.batching_strategy": ("v1", "serve.batching_strategy: Input should be 'inflight_fused_batching'"),
    "serve.kv_cache_free_gpu_mem_fraction": (1.5, "serve.kv_cache_free_gpu_mem_fraction: Input should be less "
                                                  "than or equal to 1"),
    "serve.enable_chunked_context": ("x", "serve.enable_chunked_context: Input should be a valid boolean"),
    "serve.enable_kv_cache_reuse": ("x", "serve.enable_kv_cache_reuse: Input should be a valid boolean"),
    "serve.batch_scheduler_policy": ("fifo", "serve.batch_scheduler_policy: Input should be 'guaranteed_no_evict' "
                                             "or 'max_utilization'"),
    "serve.decoupled": ("x", "serve.decoupled: Input should be a valid boolean"),
    "serve.max_queue_delay_us": (-1, "serve.max_queue_delay_us: Input should be greater than or equal to 0"),
    "serve.max_queue_size": (-1, "serve.max_queue_size: Input should be greater than or equal to 0"),
    "serve.stream_interval": (0, "serve.stream_interval: Input should be greater than or equal to 1"),
    "serve.triton_max_batch_size": (0, "serve.triton_max_batch_size: Input should be greater than or equal to 1"),
    "serve.preprocessing_instances": (0, "serve.preprocessing_instances: Input should be greater than or equal"),
    "serve.postprocessing_instances": (0, "serve.postprocessing_instances: Input should be greater than or equal"),
    "serve.bls_instances": (0, "serve.bls_instances: Input should be greater than or equal to 1"),
    "serve.http_port": (70000, "serve.http_port: Input should be less than or equal to 65535 (got 70000)"),
    "serve.grpc_port": (0, "serve.grpc_port: Input should be greater than or equal to 1"),
    "serve.metrics_port": (-1, "serve.metrics_port: Input should be greater than or equal to 1"),
    "serve.bind_address": ("my-host", "serve.bind_address: 'my-host' is not an IP address; use e.g. 127.0.0.1"),
    "serve.engine_process": ("x", "serve.engine_process: Input should be a valid boolean"),
    "sla.ttft_ms": (0, "sla.ttft_ms: Input should be greater than 0"),
    "sla.tpot_ms": (-1, "sla.tpot_ms: Input should be greater than 0"),
    "sla.e2e_ms": (0, "sla.e2e_ms: Input should be greater than 0"),
    "sla.request_rate": (0, "sla.request_rate: Input should be greater than 0"),
    "sla.concurrency": (0, "sla.concurrency: Input should be greater than or equal to 1"),
    "sla.isl": (0, "sla.isl: Input should be greater than or equal to 1"),
    "sla.osl": (0, "sla.osl: Input should be greater than or equal to 1"),
    "sla.shared_prefix_tokens": (-1, "sla.shared_prefix_tokens: Input should be greater than or equal to 0"),
}


def all_field_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        out += all_field_paths(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def with_value(path: str, value: object, base: dict | None = None) -> dict:
    data = copy.deepcopy(base or BASE)
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


def error_of(data: dict) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    return str(e.value)


def test_table_covers_every_field_and_every_field_is_documented():
    paths = all_field_paths()
    assert set(FIELD_ERRORS) == set(paths)
    for section in [Recipe] + [_model_of(f.annotation) for f in Recipe.model_fields.values()]:
        if section is not None:
            for name, field in section.model_fields.items():
                assert field.description and len(field.description) > 5, f"{section.__name__}.{name}"


@pytest.mark.parametrize("path", sorted(FIELD_ERRORS))
def test_each_field_rejects_a_bad_value_with_its_path(path):
    value, expected = FIELD_ERRORS[path]
    assert expected in error_of(with_value(path, value))


@pytest.mark.parametrize("data, expected", [
    (with_value("hardware.gpu", "custom"), "hardware.memory_gb: required when gpu is custom"),
    (with_value("hardware", {"gpu": "custom", "memory_gb": 16, "hbm_gbps": 100, "tflops": {"float16": 10}}),
     "hardware.tflops: has no figure for bfloat16 (model.dtype / quantization); add bfloat16: <TFLOP/s>"),
    (with_value("hardware.tflops", {"bf17": 3}), "hardware.tflops.bf17: Input should be 'float32', 'float16'"),
    (with_value("quantization", {"weights": "fp8"}, with_value("hardware.gpu", "A100-80")),
     "quantization.weights: fp8 cannot run here: A100-80 is SM80 and has no FP8 tensor cores"),
    (with_value("quantization", {"kv_cache": "fp8"}, with_value("hardware.gpu", "A10-24GB")),
     "quantization.kv_cache: fp8 cannot run here: A10-24GB is SM86"),
    (with_value("parallel", {"tp_size": 4, "pp_size": 4}), "parallel: tp_size*pp_size=16 exceeds the 8 GPUs"),
    (with_value("parallel", {"tp_size": 4, "moe_ep_size": 3}), "parallel.moe_ep_size: 3 does not divide "
                                                               "tp_size=4; valid: 1, 2, 4"),
    (with_value("parallel", {"tp_size": 4, "moe_ep_size": 2, "moe_tp_size": 4}),
     "parallel.moe_tp_size: moe_tp_size*moe_ep_size=4*2=8 must equal tp_size=4; set moe_tp_size: 2"),
    (with_value("parallel", "bogus"), "parallel: must be 'auto' or a mapping of tp_size, pp_size"),
    (with_value("parallel", {"tp_size": 2, "pp_size": 2, "pp_micro_batches": 99}),
     "parallel.pp_micro_batches: 99 exceeds build.max_batch_size=64"),
    (with_value("build", {"max_input_len": 4096, "max_seq_len": 8192, "max_num_tokens": 2048}),
     "build.max_num_tokens: 2048 < build.max_input_len=4096: a whole prompt must fit one step; raise it or set "
     "serve.enable_chunked_context: true"),
    (with_value("build", {"max_input_len": 4096, "max_seq_len": 2048}), "build.max_input_len: 4096 exceeds "
                                                                        "max_seq_len=2048"),
    (with_value("build", {"max_batch_size": 64, "max_beam_width": 4, "max_num_tokens": 128, "max_input_len": 64}),
     "build.max_num_tokens: 128 < max_batch_size*max_beam_width=256"),
    (with_value("sla.isl", 5000), "sla.isl: 5000 exceeds build.max_input_len=1024"),
    (with_value("sla.osl", 2000), "sla.osl: isl+osl=2128 exceeds build.max_seq_len=2048"),
    (with_value("serve", {"grpc_port": 8000}), "serve.grpc_port: 8000 is already serve.http_port"),
    (with_value("sla", {"ttft_ms": None, "tpot_ms": None}), "sla.tpot_ms: no latency target"),
    (with_value("sla", {"request_rate": 2.0}), "sla.request_rate: give request_rate or concurrency, not both"),
    (with_value("sla", {"concurrency": None}), "sla.concurrency: no load"),
    (with_value("sla", {"isl": 64, "shared_prefix_tokens": 64}),
     "sla.shared_prefix_tokens: 64 must be less than isl=64: every prompt has tokens of its own"),
    (with_value("build.max_batch_sise", 3), "build.max_batch_sise: unknown field; did you mean 'max_batch_size'?"),
    (with_value("servee", {}), "servee: unknown field; did you mean 'serve'? Valid fields here: name, model"),
    ({"name": "t"}, "model: required field is missing; add it (The checkpoint.)"),
    ({"model": {"source": "a/b"}}, "name: required field is missing"),
    ({"name": "t", "model": {}}, "model.source: required field is missing; add it (Hugging Face repo id"),
])
def test_cross_field_rules_name_the_field_and_the_fix(data, expected):
    assert expected in error_of(data)


def test_several_problems_are_reported_together():
    data = with_value("build.max_batch_size", 0, with_value("serve.http_port", 0))
    lines = error_of(data).splitlines()
    assert any(line.startswith("build.max_batch_size:") for line in lines)
    assert any(line.startswith("serve.http_port:") for line in lines)


def test_recipe_is_frozen_and_defaults_match_the_architecture_doc():
    r = parse_recipe(BASE)
    with pytest.raises(ValidationError, match="frozen"):
        r.name = "other"  # type: ignore[misc]
    assert r.parallel == "auto" and r.serve.bind_address == "127.0.0.1" and r.build.target == "reference"
    assert (r.serve.http_port, r.serve.grpc_port, r.serve.metrics_port) == (8000, 8001, 8002)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.model.spec  # every shipped recipe plans without network


def test_tiny_recipes_are_cpu_runs():
    for arch in ("llama", "mixtral"):
        r = load_recipe(next(p for p in RECIPES if p.stem == f"tiny-{arch}"))
        assert (r.model.source, r.model.spec, r.model.dtype) == (f"out/tiny-{arch}-hf", f"tiny-{arch}", "float32")
        assert r.build.target == "reference" and r.serve.decoupled
        assert (r.parallel.tp_size, r.parallel.pp_size) == (1, 1)
        b = r.build
        assert (b.max_batch_size, b.max_input_len, b.max_seq_len, b.max_num_tokens, b.tokens_per_block) == \
            (16, 256, 512, 1024, 16)


def write(tmp_path: Path, data: object, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed"))
    with pytest.raises(RecipeError, match="recipe: must be a mapping of sections"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("parallel, expected", [
    ({"tp_size": 3}, "parallel.tp_size: 3 does not divide num_attention_heads=40; valid: 1, 2, 4, 8"),
    ({"tp_size": 5}, "parallel.tp_size: 5 does not divide intermediate_size=13824; valid: 1, 2, 4, 8"),
    ({"tp_size": 1, "pp_size": 8, "moe_ep_size": 1}, None),
    ({"tp_size": 2, "moe_ep_size": 2}, "parallel.moe_ep_size: 2 but llama-2-13b is dense (no experts)"),
    ({"tp_size": 2, "moe_tp_size": 1}, "parallel.moe_tp_size: 1 but llama-2-13b is dense (no experts); remove"),
])
def test_load_recipe_checks_the_layout_against_the_shipped_spec(tmp_path, parallel, expected):
    data = {**BASE, "model": {"source": "meta-llama/Llama-2-13b-hf"}, "parallel": parallel}
    path = write(tmp_path, data)
    if expected is None:
        assert load_recipe(path).parallel.pp_size == 8
    else:
        with pytest.raises(RecipeError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
            load_recipe(path)
        assert load_recipe(path, check_model=False).parallel.tp_size == parallel["tp_size"]


def test_model_limits_and_moe_rules_use_the_spec(tmp_path):
    tiny = {**BASE, "model": {"source": "x", "spec": "tiny-mixtral"},
            "build": {"max_seq_len": 1024, "max_input_len": 256}}
    with pytest.raises(RecipeError, match="build.max_seq_len: 1024 exceeds the model's max_position_embeddings=512"):
        load_recipe(write(tmp_path, tiny))
    mix = {**BASE, "model": {"source": "mistralai/Mixtral-8x22B-Instruct-v0.1"},
           "hardware": {"gpu": "A100-80", "nodes": 2}, "parallel": {"tp_size": 16, "moe_ep_size": 16}}
    with pytest.raises(RecipeError, match="parallel.moe_ep_size: 16 does not divide num_experts=8; valid with "
                                          "tp_size=16: 1, 2, 4, 8"):
        load_recipe(write(tmp_path, mix))
    mix["parallel"] = {"tp_size": 16, "pp_size": 1, "moe_ep_size": 8}
    assert load_recipe(write(tmp_path, mix)).parallel.moe_ep_size == 8


def test_relative_local_source_resolves_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    r = parse_recipe({**BASE, "model": {"source": "models/m"}})
    assert r.model.local_path() == (tmp_path / "models" / "m").resolve()
    assert parse_recipe({**BASE, "model": {"source": "./not-yet"}}).model.local_path() == tmp_path / "not-yet"
    assert parse_recipe(BASE).model.local_path() is None  # a Hub repo id


def test_json_schema_has_every_field_with_its_docstring():
    schema = Recipe.model_json_schema()
    text = json.dumps(schema)
    for path in all_field_paths():
        assert f'"{path.rsplit(".", 1)[-1]}"' in text
    assert "Tensor-parallel ranks" in schema["$defs"]["ParallelSection"]["properties"]["tp_size"]["description"]
    assert schema["additionalProperties"] is False
