"""Typed view of a Hugging Face `config.json` for the architectures enginesmith supports."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# HF architecture -> family. Mistral and Mixtral map to TensorRT-LLM's LLaMAForCausalLM too.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
}
# Architectures the planner can size (memory, roofline) but nothing downstream can convert yet.
# Kimi-K2 ships as DeepseekV3ForCausalLM (model_type kimi_k2).
PLANNING_ONLY_ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class ModelSpecError(ValueError):
    """A config.json enginesmith cannot plan or convert."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape facts of one decoder-only model; all sizes in elements, not bytes."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """FFN width of dense layers (per expert for Mixtral, whose layers are all MoE)."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attn_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    num_experts: int = 0
    """Routed experts per MoE layer; 0 for a dense model."""
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    """Per-expert FFN width (equals intermediate_size for Mixtral)."""
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    first_k_dense_replace: int = 0
    """Leading layers of an MoE model that use a dense MLP of `intermediate_size` (DeepSeek-V3: 3, Kimi-K2: 1)."""
    n_shared_experts: int = 0
    """Always-on shared experts per MoE layer, each `moe_intermediate_size` wide (DeepSeek/Kimi: 1)."""
    router_bias: bool = False
    """The router carries a per-expert score-correction bias (DeepSeek-V3 `noaux_tc`)."""
    q_lora_rank: int = 0
    """MLA query compression rank; 0 = uncompressed queries."""
    kv_lora_rank: int = 0
    """MLA latent KV width; > 0 marks Multi-head Latent Attention (one latent cached per token and layer)."""
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    published_quant: str = ""
    """`quantization_config.quant_method` of the checkpoint as published ("fp8" for DeepSeek-V3 / Kimi-K2);
    "" when its weights are plain floats."""

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES.get(self.architecture) or PLANNING_ONLY_ARCHITECTURES[self.architecture]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def convertible(self) -> bool:
        """False for planning-only architectures (see `check_convertible`)."""
        return self.architecture in SUPPORTED_ARCHITECTURES

    def check_convertible(self) -> None:
        """Raise the 'not supported yet' error conversion must give for planning-only specs."""
        if not self.convertible:
            raise ModelSpecError(
                f"not supported yet: {self.architecture} for convert (enginesmith can plan it but not "
                f"convert it; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer `layer` has routed experts."""
        return self.is_moe and layer >= self.first_k_dense_replace

    @property
    def shared_expert_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    def num_params(self) -> int:
        """Unique parameters (a tied lm_head counted once), as published model cards count them."""
        from enginesmith.builders.planner.weights import param_counts

        return param_counts(self).total

    def num_active_params(self) -> int:
        """Parameters one token passes through (top-k of the routed experts)."""
        from enginesmith.builders.planner.weights import param_counts

        return param_counts(self).active

    def weight_bytes(self, dtype: str | None = None) -> int:
        """Bytes of all unique parameters stored in `dtype` (default: the checkpoint's dtype)."""
        return self.num_params() * DTYPE_BYTES[dtype or self.torch_dtype]

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token needs over all layers, unsharded (MLA: the latent plus rope key)."""
        if self.is_mla:
            return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "", planning: bool = False) -> ModelSpec:
        """Parse a Hugging Face config dict; unsupported architectures raise ModelSpecError.

        `planning=True` also accepts PLANNING_ONLY_ARCHITECTURES (shapes for memory and roofline maths).
        """
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else "<missing 'architectures'>"
        if arch in PLANNING_ONLY_ARCHITECTURES and not planning:
            raise ModelSpecError(f"not supported yet: {arch} (planning only; convert supports: "
                                 f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        if arch not in SUPPORTED_ARCHITECTURES and arch not in PLANNING_ONLY_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise ModelSpecError(f"not supported yet: {arch} (supported: {supported})")
        try:
            if arch in PLANNING_ONLY_ARCHITECTURES:
                return cls(**{**_common_fields(cfg, arch, name), **_deepseek_fields(cfg)})
            num_experts = int(cfg.get("num_local_experts", 0) or 0)
            return cls(
                **_common_fields(cfg, arch, name),
                attn_bias=SUPPORTED_ARCHITECTURES[arch] == "qwen2" or bool(cfg.get("attention_bias", False)),
                num_experts=num_experts,
                num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0) if num_experts else 0,
                moe_intermediate_size=int(cfg["intermediate_size"]) if num_experts else 0,
            )
        except KeyError as e:
            raise ModelSpecError(f"config.json of {name or arch} lacks required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:  # a size that is not a number
            raise ModelSpecError(f"config.json of {name or arch} has a setting of the wrong type ({e}); fix it or "
                                 "download the model again") from None

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, planning: bool = False) -> ModelSpec:
        """Read `<path>/config.json`."""
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelSpecError(f"no config.json in {path}")
        try:
            cfg = json.loads(p.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelSpecError(f"{p} is not valid JSON ({type(e).__name__}: {e}); the file is corrupted, download "
                                 "it again") from None
        if not isinstance(cfg, dict):
            raise ModelSpecError(f"{p} holds a JSON {type(cfg).__name__}, not the model's settings (an object); "
                                 "the file is corrupted, download it again")
        return cls.from_hf_config(cfg, name=str(path), planning=planning)


def _common_fields(cfg: dict[str, Any], arch: str, name: str) -> dict[str, Any]:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return dict(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        **_rope(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        name=name,
        published_quant=str((cfg.get("quantization_config") or {}).get("quant_method") or ""),
    )


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling; transformers >= 5 writes both into one `rope_parameters` dict."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = cfg.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _deepseek_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """MLA and shared-expert MoE fields of a DeepSeek-V3-shaped config (Kimi-K2 uses the same keys)."""
    rope, nope = int(cfg["qk_rope_head_dim"]), int(cfg["qk_nope_head_dim"])
    return dict(
        num_experts=int(cfg["n_routed_experts"]),
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        first_k_dense_replace=int(cfg.get("first_k_dense_replace", 0)),
        n_shared_experts=int(cfg.get("n_shared_experts") or 0),
        router_bias=cfg.get("topk_method") == "noaux_tc",
        q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=int(cfg["v_head_dim"]),
        head_dim=nope + rope,
    )
