"""The unified checkpoint's `config.json` (TensorRT-LLM 1.2.x `PretrainedConfig` / `LLaMAConfig` / `QWenConfig`).

Only keys the pinned version's constructors accept are written (`Mapping.from_dict`, `QuantConfig` and
`MoeConfig` reject unknown keys); see `shared/reference/upstream-templates/checkpoint-config-keys.md`.
"""

from __future__ import annotations

from typing import Any

from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec

MOE_RENORMALIZE, MOE_NONE = 1, 0


def rope_params(spec: ModelSpec, hf_config: dict[str, Any] | None) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling), reading transformers 5's `rope_parameters` as well as 4.x keys."""
    hf_config = hf_config or {}
    params = hf_config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta") or hf_config.get("rope_theta") or spec.rope_theta)
    scaling = hf_config.get("rope_scaling") or spec.rope_scaling
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return theta, scaling


def quant_config(quant_algo: str | None) -> dict[str, Any]:
    """QuantConfig fields of the 1.2 line (all but mamba_ssm_cache_dtype, which older versions reject)."""
    return {"quant_algo": quant_algo, "kv_cache_quant_algo": None, "group_size": 128, "smoothquant_val": 0.5,
            "clamp_val": None, "use_meta_recipe": False, "has_zero_point": False, "pre_quant_scale": False,
            "exclude_modules": None}


def moe_config(spec: ModelSpec) -> dict[str, Any]:
    mode = MOE_RENORMALIZE if spec.family == "mixtral" else MOE_NONE
    return {"num_experts": spec.num_experts, "shared_expert_intermediate_size": 0,
            "top_k": spec.num_experts_per_tok, "normalization_mode": mode if spec.is_moe else MOE_RENORMALIZE,
            "sparse_mixer_epsilon": 0.01, "tp_mode": 0, "device_limited_n_group": 0,
            "device_limited_topk_group": 0, "device_limited_routed_scaling_factor": 1.0}


def family_keys(spec: ModelSpec) -> dict[str, Any]:
    """Keys of the model-family config class (LLaMAConfig or QWenConfig)."""
    if spec.family == "qwen2":
        return {"qwen_type": "qwen2", "use_logn_attn": False, "seq_length": 8192, "num_labels": 1,
                "disable_weight_only_quant_plugin": False}
    return {"residual_mlp": False, "disable_weight_only_quant_plugin": False, "remove_duplicated_kv_heads": False,
            "embedding_multiplier": 1.0, "attention_multiplier": 1.0, "residual_multiplier": 1.0,
            "output_multiplier_scale": 1.0, "fc_after_embed": False,
            "use_input_layernorm_in_first_layer": True, "use_last_layernorm": True, "layer_idx_offset": 0}


def trtllm_config(spec: ModelSpec, mapping: Mapping, dtype: str, quant_algo: str | None = None,
                  hf_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    rotary_base, rotary_scaling = rope_params(spec, hf_config)
    return {
        "architecture": spec.architecture,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_size": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        # Mixtral: the MoE layer doubles fc only for a gated activation name (from_hugging_face forces swiglu).
        "hidden_act": "swiglu" if spec.family == "mixtral" else spec.hidden_act,
        "norm_epsilon": spec.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": spec.max_position_embeddings,
        "rotary_embedding_dim": spec.head_dim,
        "rotary_base": rotary_base,
        "rotary_scaling": rotary_scaling,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "mlp_bias": False,
        "attn_bias": spec.attn_bias,
        "qk_layernorm": False,
        **family_keys(spec),
        "moe": moe_config(spec),
        "mapping": mapping.to_trtllm_dict(),
        "quantization": quant_config(quant_algo),
    }
