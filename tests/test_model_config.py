"""Our ModelConfig builders against upstream's config.pbtxt templates, model by model.

Each upstream template (TensorRT-LLM triton_backend/all_models, the newest engine-era version) is filled
with the same values our repository writer uses, parsed, and compared with our protobuf. The only
differences allowed are listed in DIFFERENCES with their reason; each must actually occur, so the list
cannot go stale.
"""

from __future__ import annotations

import string
from pathlib import Path
from types import SimpleNamespace

import pytest

from enginesmith.builders.mapping import Mapping
from tests.test_build_flags import _reference_dir
from enginesmith.triton_repo import model_config as mc
from enginesmith.triton_repo.repository import model_parameters, tensorrt_llm_parameters

# Upstream's templates (byte copies, see SOURCES.md there) from the shared reference folder (tests/data).
UPSTREAM = _reference_dir() / "upstream-templates/TensorRT-LLM-triton_backend/all_models"
IFB = UPSTREAM / "inflight_batcher_llm"

# Template variable -> our parameter key, where upstream names them differently.
PARAM_OF_VARIABLE = {"batching_strategy": "gpt_model_type", "engine_dir": "gpt_model_path",
                     "encoder_engine_dir": "encoder_model_path"}

DIFFERENCES = {
    "ensemble": [("output kv_cache_alloc_total_blocks is declared once",
                  "upstream declares it twice (a copy-paste quirk); Triton keeps one tensor per name")],
    "tensorrt_llm": [("parameter lora_prefetch_dir is left out when unset",
                      "an empty value would make the C++ backend prefetch LoRA weights from ''; a missing key "
                      "is its documented 'not set' (GetParameter throws, the default applies)")],
    "llmapi": [("max_batch_size and model_transaction_policy are written in config.pbtxt",
                "upstream leaves them to model.yaml via auto-complete, which --disable-auto-complete-config "
                "(used by every launch) turns off")],
}


def options(backend: str = "tensorrtllm", decoupled: bool = True) -> mc.RepoOptions:
    return mc.RepoOptions(triton_max_batch_size=8, decoupled=decoupled, tensorrt_llm_backend=backend,
                          max_queue_delay_us=100, max_queue_size=7, preprocessing_instances=2,
                          postprocessing_instances=3, bls_instances=4)


def structural(o: mc.RepoOptions) -> dict[str, str]:
    return {
        "triton_backend": o.tensorrt_llm_backend, "triton_max_batch_size": str(o.triton_max_batch_size),
        "decoupled_mode": "true" if o.decoupled else "false",
        "max_queue_delay_microseconds": str(o.max_queue_delay_us), "max_queue_size": str(o.max_queue_size),
        "preprocessing_instance_count": str(o.preprocessing_instances),
        "postprocessing_instance_count": str(o.postprocessing_instances),
        "bls_instance_count": str(o.bls_instances), "logits_datatype": f"TYPE_{o.logits_datatype}",
        "prompt_embedding_table_data_type": f"TYPE_{o.prompt_table_datatype}",
        "encoder_input_features_data_type": f"TYPE_{o.encoder_features_datatype}",
    }


def fill(path: Path, values: dict[str, str]):
    """Upstream's fill_template, strict: every ${variable} must be given (a missing one raises KeyError)."""
    text = string.Template(path.read_text()).substitute(values)
    return mc.parse_pbtxt(text)


def recipe_stub():
    build = SimpleNamespace(max_beam_width=1, target="trtllm-engine")
    serve = SimpleNamespace(batching_strategy="inflight_fused_batching", batch_scheduler_policy="max_utilization",
                            kv_cache_free_gpu_mem_fraction=0.85, enable_kv_cache_reuse=False,
                            enable_chunked_context=True, stream_interval=1)
    return SimpleNamespace(build=build, serve=serve)


def params_as_variables(params: dict[str, str]) -> dict[str, str]:
    variables = {k: v for k, v in params.items()}
    for var, key in PARAM_OF_VARIABLE.items():
        if key in params:
            variables[var] = params[key]
    return variables


def ours(cfg):
    """Our config as written to disk and read back (checks the text round trip too)."""
    text = mc.to_pbtxt(cfg)
    assert "${" not in text
    return mc.parse_pbtxt(text)


def test_ensemble_matches_upstream():
    o = options()
    upstream = fill(IFB / "ensemble/config.pbtxt", structural(o))
    names = [t.name for t in upstream.output]
    dup = names.index("kv_cache_alloc_total_blocks")
    assert names.count("kv_cache_alloc_total_blocks") == 2, DIFFERENCES["ensemble"][0]
    del upstream.output[dup]
    assert ours(mc.ensemble_config(o)) == upstream


@pytest.mark.parametrize("backend", ["tensorrtllm", "python"])
@pytest.mark.parametrize("decoupled", [True, False])
def test_tensorrt_llm_matches_upstream(backend, decoupled):
    o = options(backend, decoupled)
    params = tensorrt_llm_parameters(recipe_stub(), Mapping.create(2, 2), Path("/engines/e"), Path("/tok"))
    assert "lora_prefetch_dir" not in params, DIFFERENCES["tensorrt_llm"][0]
    upstream = fill(IFB / "tensorrt_llm/config.pbtxt",
                    {**structural(o), **params_as_variables(params), "lora_prefetch_dir": ""})
    del upstream.parameters["lora_prefetch_dir"]
    got = ours(mc.tensorrt_llm_config(o, params))
    assert got == upstream
    assert got.backend == backend and got.model_transaction_policy.decoupled is decoupled


def test_tensorrt_llm_parameter_values_come_from_the_recipe():
    params = tensorrt_llm_parameters(recipe_stub(), Mapping.create(4, 4, gpus_per_node=8), Path("/e"), Path("/t"))
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["batch_scheduler_policy"] == "max_utilization"
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.85"
    assert params["enable_kv_cache_reuse"] == "false"  # said explicitly: the C++ backend's default is true
    assert params["enable_chunked_context"] == "true"
    assert params["num_nodes"] == "2"  # 16 ranks over 8 GPUs per node
    assert params["gpt_model_path"] == "/e" and params["tokenizer_dir"] == "/t"
    assert params["max_tokens_in_paged_kv_cache"] == ""  # unset -> backend default


def test_preprocessing_postprocessing_bls_match_upstream():
    o = options()
    params = model_parameters(Path("/engines/e"), Path("/tok"))
    for model, build in (("preprocessing", mc.preprocessing_config), ("postprocessing", mc.postprocessing_config),
                         ("tensorrt_llm_bls", mc.bls_config)):
        upstream = fill(IFB / model / "config.pbtxt", {**structural(o), **params_as_variables(params[model])})
        assert ours(build(o, params[model])) == upstream, model


def test_llmapi_matches_upstream():
    o = options(backend="python", decoupled=True)
    upstream = mc.parse_pbtxt((UPSTREAM / "llmapi/tensorrt_llm/config.pbtxt").read_text())
    got = ours(mc.llmapi_config(o))
    assert got.HasField("model_transaction_policy") and not upstream.HasField("model_transaction_policy"), \
        DIFFERENCES["llmapi"][0]
    assert got.max_batch_size == 0 == upstream.max_batch_size
    got.ClearField("model_transaction_policy")
    assert got == upstream


def test_every_model_is_listed_with_its_differences():
    built = {"ensemble", "tensorrt_llm", "preprocessing", "postprocessing", "tensorrt_llm_bls", "llmapi"}
    assert set(DIFFERENCES) <= built
    for diffs in DIFFERENCES.values():
        assert all(what and why for what, why in diffs)


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match=r"unknown parameters \['tokenizer_path'\]"):
        mc.postprocessing_config(options(), {"tokenizer_path": "/tok"})


def test_parameter_values_must_be_strings():
    with pytest.raises(ValueError, match="skip_special_tokens must be a string"):
        mc.postprocessing_config(options(), {"skip_special_tokens": True})


@pytest.mark.parametrize("field,value,match", [
    ("triton_max_batch_size", 0, "triton_max_batch_size=0"),
    ("tensorrt_llm_backend", "onnx", "use tensorrtllm or python"),
    ("logits_datatype", "FLOAT", "logits_datatype='FLOAT'"),
    ("bls_instances", 0, "bls_instances=0"),
])
def test_options_are_validated(field, value, match):
    kwargs = dict(triton_max_batch_size=4, decoupled=True) | {field: value}
    with pytest.raises(ValueError, match=match):
        mc.RepoOptions(**kwargs)


def test_ensemble_wiring_only_uses_declared_tensors():
    """Every step tensor exists in that model's config, and every ensemble input/output is used."""
    o = options()
    params = model_parameters(Path("/e"), Path("/t"))
    steps = {"preprocessing": mc.preprocessing_config(o, params["preprocessing"]),
             "tensorrt_llm": mc.tensorrt_llm_config(o, {}),
             "postprocessing": mc.postprocessing_config(o, params["postprocessing"])}
    ens = mc.ensemble_config(o)
    used = set()
    for step in ens.ensemble_scheduling.step:
        cfg = steps[step.model_name]
        assert set(step.input_map) <= {t.name for t in cfg.input}, step.model_name
        assert set(step.output_map) <= {t.name for t in cfg.output}, step.model_name
        used |= set(step.input_map.values()) | set(step.output_map.values())
    assert {t.name for t in ens.input} <= used
    assert {t.name for t in ens.output} <= used
