"""Engine directory checks and the refusal to serve an engine on another GPU / TensorRT-LLM version.

The engine directories here are hand-made in the shape `Engine.save` writes (config.json with
version / pretrained_config / build_config, rank{N}.engine): they test our checks, not a build.
"""

from __future__ import annotations

import json

import pytest

from enginesmith.builders.build.cache import EngineManifest
from enginesmith.builders.build.engine_check import (
    EngineCheckError,
    EngineCompatibilityError,
    build_config_differences,
    check_engine_compatible,
    verify_engine_dir,
)
from enginesmith.builders.mapping import Mapping

ASKED = {"max_batch_size": "64", "max_input_len": "1024", "max_seq_len": "2048", "max_num_tokens": "8192",
         "max_beam_width": "1", "kv_cache_type": "paged", "tokens_per_block": "32",
         "remove_input_padding": "enable", "gpt_attention_plugin": "auto", "gemm_plugin": "disable",
         "context_fmha": "enable", "use_fused_mlp": "enable", "reduce_fusion": "enable"}


def _engine_config(**plugin_overrides) -> dict:
    plugins = {"gpt_attention_plugin": "bfloat16", "gemm_plugin": None, "context_fmha": True,
               "remove_input_padding": True, "tokens_per_block": 32, "reduce_fusion": True}
    plugins.update(plugin_overrides)
    return {"version": "1.2.1",
            "pretrained_config": {"architecture": "LlamaForCausalLM",
                                  "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1}},
            "build_config": {"max_batch_size": 64, "max_input_len": 1024, "max_seq_len": 2048,
                             "max_num_tokens": 8192, "max_beam_width": 1, "kv_cache_type": "PAGED",
                             "plugin_config": plugins}}


def _engine_dir(tmp_path, ranks=(0, 1), **plugin_overrides):
    d = tmp_path / "engine"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_engine_config(**plugin_overrides)))
    for r in ranks:
        (d / f"rank{r}.engine").write_bytes(b"not a real engine")
    return d


def test_build_config_matching_what_was_asked_has_no_differences():
    assert build_config_differences(ASKED, _engine_config(), "bfloat16") == []


def test_build_config_differences_name_the_setting_and_both_values():
    cfg = _engine_config(reduce_fusion=False)
    cfg["build_config"]["max_num_tokens"] = 4096
    diffs = build_config_differences(ASKED, cfg, "bfloat16")
    assert diffs == ["max_num_tokens: asked 8192, engine has 4096", "reduce_fusion: asked enable, engine has False"]


def test_verify_engine_dir_accepts_a_complete_dir(tmp_path):
    d = _engine_dir(tmp_path)
    cfg = verify_engine_dir(d, [0, 1], Mapping.create(tp_size=2), ASKED, "bfloat16")
    assert cfg["version"] == "1.2.1"


def test_verify_engine_dir_names_a_missing_rank_engine(tmp_path):
    d = _engine_dir(tmp_path, ranks=(0,))
    with pytest.raises(EngineCheckError, match=r"rank1\.engine missing"):
        verify_engine_dir(d, [0, 1], Mapping.create(tp_size=2), ASKED, "bfloat16")


def test_verify_engine_dir_refuses_another_layout(tmp_path):
    d = _engine_dir(tmp_path)
    with pytest.raises(EngineCheckError, match=r"mapping\.tp_size=2, plan has 1"):
        verify_engine_dir(d, [0, 1], Mapping.create(tp_size=1, pp_size=2), ASKED, "bfloat16")


def test_verify_engine_dir_refuses_a_build_config_that_differs(tmp_path):
    d = _engine_dir(tmp_path, gemm_plugin="bfloat16")
    with pytest.raises(EngineCheckError, match="gemm_plugin: asked disable, engine has bfloat16"):
        verify_engine_dir(d, [0, 1], Mapping.create(tp_size=2), ASKED, "bfloat16")


def _built(tmp_path, target="trtllm-engine") -> str:
    d = tmp_path / "built"
    EngineManifest(target=target, key="k", trtllm_version="1.2.1", gpu_compute_capability="9.0",
                   gpu_name="NVIDIA H100 80GB HBM3").write(d)
    return str(d)


def test_compatible_engine_passes(tmp_path):
    m = check_engine_compatible(_built(tmp_path), gpu_compute_capability="9.0", gpu_name="NVIDIA H200",
                                trtllm_version="1.2.1")
    assert m.target == "trtllm-engine"


def test_other_gpu_arch_is_refused_naming_both(tmp_path):
    with pytest.raises(EngineCompatibilityError) as e:
        check_engine_compatible(_built(tmp_path), gpu_compute_capability="8.0",
                                gpu_name="NVIDIA A100-SXM4-80GB", trtllm_version="1.2.1")
    msg = str(e.value)
    assert "compute capability 9.0 (NVIDIA H100 80GB HBM3)" in msg
    assert "compute capability 8.0 (NVIDIA A100-SXM4-80GB)" in msg


def test_other_trtllm_version_is_refused_naming_both(tmp_path):
    with pytest.raises(EngineCompatibilityError) as e:
        check_engine_compatible(_built(tmp_path), gpu_compute_capability="9.0", trtllm_version="1.3.0rc20")
    assert "TensorRT-LLM 1.2.1" in str(e.value) and "TensorRT-LLM 1.3.0rc20" in str(e.value)


def test_missing_trtllm_on_the_serving_side_is_refused(tmp_path):
    # Nothing installs TensorRT-LLM here, so detection finds none.
    with pytest.raises(EngineCompatibilityError, match="this Python has no TensorRT-LLM to serve it"):
        check_engine_compatible(_built(tmp_path), gpu_compute_capability="9.0")


def test_targets_without_compiled_engines_always_pass(tmp_path):
    assert check_engine_compatible(_built(tmp_path, "reference"), gpu_compute_capability="8.0").target == "reference"


def test_no_manifest_is_refused(tmp_path):
    with pytest.raises(EngineCompatibilityError, match="enginesmith build"):
        check_engine_compatible(tmp_path)
