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


class ModelSpecError(ValueError):
    """A config.json enginesmith cannot plan or convert."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape facts of one decoder-only model; all sizes in elements, not bytes."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
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

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> ModelSpec:
        """Parse a Hugging Face config dict; unsupported architectures raise ModelSpecError."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else "<missing 'architectures'>"
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise ModelSpecError(f"not supported yet: {arch} (supported: {supported})")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            num_experts = int(cfg.get("num_local_experts", 0) or 0)
            return cls(
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
                rope_theta=_rope_theta(cfg),
                rope_scaling=_rope_scaling(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attn_bias=SUPPORTED_ARCHITECTURES[arch] == "qwen2" or bool(cfg.get("attention_bias", False)),
                num_experts=num_experts,
                num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0) if num_experts else 0,
                moe_intermediate_size=int(cfg["intermediate_size"]) if num_experts else 0,
                hidden_act=str(cfg.get("hidden_act", "silu")),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
                name=name,
            )
        except KeyError as e:
            raise ModelSpecError(f"config.json of {name or arch} lacks required key {e.args[0]!r}") from None

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> ModelSpec:
        """Read `<path>/config.json`."""
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelSpecError(f"no config.json in {path}")
        return cls.from_hf_config(json.loads(p.read_text()), name=str(path))


def _rope_theta(cfg: dict[str, Any]) -> float:
    """transformers >= 5 writes `rope_parameters: {rope_theta, rope_type, ...}` instead of `rope_theta`."""
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    if cfg.get("rope_scaling"):
        return cfg["rope_scaling"]
    params = cfg.get("rope_parameters") or {}
    if params.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}
