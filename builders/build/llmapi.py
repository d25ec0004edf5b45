"""Build target `trtllm-llmapi`: LLM-API options for TensorRT-LLM >= 1.0 (PyTorch backend, no engines).

Two files from one recipe, both in `engine/`:
- `llm_api_options.yaml`: `trtllm-serve MODEL --config llm_api_options.yaml` (TorchLlmArgs keys);
- `model.yaml`: the Triton `llmapi` model's `tensorrt_llm/1/model.yaml` (upstream template in
  `triton_backend/all_models/llmapi/tensorrt_llm/1/model.yaml`): `model`, `backend`, the same
  options, and `triton_config`.
Key names are TensorRT-LLM's (`tensor_parallel_size`, `kv_cache_config.free_gpu_memory_fraction`, ...), and
only those of the PyTorch backend's `TorchLlmArgs` (every LLM-API argument class rejects unknown keys; the
table they are checked against is tests/data/trtllm-llmapi-args/). That backend takes the quantization from
the checkpoint (`quant_config` is a TensorRT-backend argument): a quantized recipe needs a checkpoint
quantized beforehand as its model source (`prequantized_checkpoint_note`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from enginesmith.builders.build.cache import (
    IGNORED_FACTORS,
    BuildResult,
    EngineManifest,
    cache_key,
    changed_factors,
    is_fresh,
    remove_stale_outputs,
)
from enginesmith.builders.manifest import atomic_write_text, sha256_file, sha256_json, tool_versions

TARGET = "trtllm-llmapi"
OPTIONS_FILE = "llm_api_options.yaml"
MODEL_YAML = "model.yaml"

BACKEND = "pytorch"
"""The LLM-API backend these files are for: TensorRT-LLM 1.x's default, and the Triton llmapi model's."""
# TorchLlmArgs fields this module may write (TensorRT-LLM 1.2 tensorrt_llm/llmapi/llm_args.py).
LLMAPI_KEYS = frozenset({
    "model", "backend", "dtype", "trust_remote_code", "revision",
    "tensor_parallel_size", "pipeline_parallel_size", "moe_expert_parallel_size", "moe_tensor_parallel_size",
    "gpus_per_node", "max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len", "max_beam_width",
    "enable_chunked_prefill", "kv_cache_config", "scheduler_config",
})
KV_CACHE_CONFIG_KEYS = frozenset({"free_gpu_memory_fraction", "enable_block_reuse", "tokens_per_block", "dtype"})
TRITON_CONFIG_KEYS = frozenset({"max_batch_size", "decoupled"})

# recipe quantization -> TensorRT-LLM QuantAlgo names (what the pre-quantized checkpoint must carry).
_QUANT_ALGO = {"fp8": "FP8", "int8_weight_only": "W8A16", "int4_weight_only": "W4A16"}
_SCHEDULER = {"guaranteed_no_evict": "GUARANTEED_NO_EVICT", "max_utilization": "MAX_UTILIZATION"}


def prequantized_checkpoint_note(recipe) -> str | None:
    """Why a quantized recipe needs a checkpoint quantized beforehand (None when the weights are not)."""
    algo = _QUANT_ALGO.get(recipe.quantization.weights)
    if algo is None:
        return None
    return (f"quantization.weights={recipe.quantization.weights}: the LLM API's PyTorch backend does not quantize "
            f"on load; model.source must be a checkpoint already quantized to {algo} (e.g. with NVIDIA ModelOpt), "
            "whose own quantization config it reads")


def llm_api_options(recipe, plan) -> dict:
    """The LLM-API arguments (for `trtllm-serve --config` and the Triton llmapi model)."""
    m, b, s = plan.mapping, recipe.build, recipe.serve
    opts: dict = {
        "tensor_parallel_size": m.tp_size,
        "pipeline_parallel_size": m.pp_size,
    }
    if plan.spec.is_moe:
        opts["moe_expert_parallel_size"] = m.moe_ep_size
        opts["moe_tensor_parallel_size"] = m.moe_tp_size
    opts.update({
        "gpus_per_node": m.gpus_per_node,
        "dtype": recipe.model.dtype,
        "trust_remote_code": recipe.model.trust_remote_code,
        "max_batch_size": b.max_batch_size,
        "max_num_tokens": b.max_num_tokens,
        "max_seq_len": b.max_seq_len,
        "max_input_len": b.max_input_len,
        "max_beam_width": b.max_beam_width,
        "enable_chunked_prefill": s.enable_chunked_context,
        "kv_cache_config": {
            "free_gpu_memory_fraction": s.kv_cache_free_gpu_mem_fraction,
            "enable_block_reuse": s.enable_kv_cache_reuse,
            "tokens_per_block": b.tokens_per_block,
            "dtype": "fp8" if recipe.quantization.kv_cache == "fp8" else "auto",
        },
        "scheduler_config": {"capacity_scheduler_policy": _SCHEDULER[s.batch_scheduler_policy]},
    })
    return opts


def model_source(recipe, hf_dir: str | Path) -> str:
    """What the LLM API loads: the downloaded snapshot when present, else the recipe's source."""
    hf_dir = Path(hf_dir)
    return str(hf_dir.resolve()) if (hf_dir / "config.json").is_file() else str(recipe.model.source)


def triton_model_yaml(recipe, plan, model: str) -> dict:
    """The Triton llmapi model's model.yaml: upstream's keys, filled from the recipe."""
    out: dict = {"model": model, "backend": BACKEND}
    if not Path(model).is_absolute() and recipe.model.revision:
        out["revision"] = recipe.model.revision
    out.update(llm_api_options(recipe, plan))
    # The llmapi Python model does not batch at the Triton level (upstream sets 0); the LLM API batches.
    out["triton_config"] = {"max_batch_size": 0, "decoupled": recipe.serve.decoupled}
    return out


def dump_yaml(data: dict, header: str) -> str:
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def serve_command(recipe, model: str, engine_dir: str | Path) -> list[str]:
    """How to serve these options with TensorRT-LLM's own OpenAI server."""
    s = recipe.serve
    return ["trtllm-serve", model, "--config", str(Path(engine_dir) / OPTIONS_FILE),
            "--host", s.bind_address, "--port", str(s.http_port)]


def llmapi_files(recipe, plan, hf_dir: str | Path) -> dict[str, str]:
    """File name -> YAML text of both outputs."""
    model = model_source(recipe, hf_dir)
    opts = llm_api_options(recipe, plan)
    note = prequantized_checkpoint_note(recipe)
    tail = f"\n{note}." if note else ""
    return {
        OPTIONS_FILE: dump_yaml(opts, f"LLM-API options of recipe {recipe.name}: trtllm-serve MODEL --config "
                                      f"{OPTIONS_FILE}\nWritten by `enginesmith build`.{tail}"),
        MODEL_YAML: dump_yaml(triton_model_yaml(recipe, plan, model),
                              f"Triton llmapi model.yaml of recipe {recipe.name} "
                              f"(tensorrt_llm/1/model.yaml).\nWritten by `enginesmith build`.{tail}"),
    }


def build_llmapi(recipe, plan, hf_dir: str | Path, engine_dir: str | Path) -> BuildResult:
    """Write both YAML files unless the previous build made the same ones."""
    engine_dir = Path(engine_dir)
    files = llmapi_files(recipe, plan, hf_dir)
    model_yaml = triton_model_yaml(recipe, plan, model_source(recipe, hf_dir))
    factors = {"target": TARGET, "model": model_yaml["model"], "options": llm_api_options(recipe, plan),
               "triton_config": model_yaml["triton_config"], "files": sha256_json(files),
               "enginesmith": tool_versions().get("enginesmith", "unknown")}
    key = cache_key(factors)
    old = EngineManifest.read(engine_dir)
    if is_fresh(old, key, engine_dir):
        return BuildResult(TARGET, engine_dir, skipped=True)
    for name, text in files.items():
        atomic_write_text(engine_dir / name, text)
    remove_stale_outputs(old, set(files), engine_dir)
    EngineManifest(
        target=TARGET, key=key, factors=factors, ignored_factors=IGNORED_FACTORS[TARGET],
        versions=tool_versions(), outputs={n: sha256_file(engine_dir / n) for n in files},
        build_config=factors["options"],
    ).write(engine_dir)
    changed = [c for c in changed_factors(old, factors) if c != "files"] or changed_factors(old, factors)
    return BuildResult(TARGET, engine_dir, skipped=False, changed=changed, built=list(files))
