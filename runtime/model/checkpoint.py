"""The unified checkpoint's `config.json`, as the reference runtime reads it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enginesmith.builders.mapping import Mapping


class CheckpointError(ValueError):
    """A checkpoint folder the runtime cannot load."""


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    hidden_act: str
    norm_epsilon: float
    rotary_base: float
    rotary_scaling: dict[str, Any] | None
    max_position_embeddings: int
    attn_bias: bool
    num_experts: int
    moe_top_k: int
    moe_normalization_mode: int
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    mapping: Mapping

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> CheckpointConfig:
        path = Path(ckpt_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{ckpt_dir} has no config.json: not a converted checkpoint")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> CheckpointConfig:
        m = c.get("mapping", {})
        moe = c.get("moe") or {}
        quant = c.get("quantization") or {}
        heads = int(c["num_attention_heads"])
        mapping = Mapping(
            world_size=int(m.get("world_size", 1)), tp_size=int(m.get("tp_size", 1)),
            pp_size=int(m.get("pp_size", 1)), moe_tp_size=int(m.get("moe_tp_size", m.get("tp_size", 1))),
            moe_ep_size=int(m.get("moe_ep_size", 1)), gpus_per_node=int(m.get("gpus_per_node", 8)),
        )
        return cls(
            architecture=c["architecture"], dtype=c["dtype"], vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]), num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(c.get("num_key_value_heads") or heads),
            head_size=int(c.get("head_size") or int(c["hidden_size"]) // heads),
            intermediate_size=int(c.get("intermediate_size") or 4 * int(c["hidden_size"])),
            hidden_act=c.get("hidden_act", "silu"), norm_epsilon=float(c.get("norm_epsilon", 1e-5)),
            rotary_base=float(c.get("rotary_base", 10000.0)), rotary_scaling=c.get("rotary_scaling"),
            max_position_embeddings=int(c.get("max_position_embeddings") or 2048),
            attn_bias=bool(c.get("attn_bias", False)),
            num_experts=int(moe.get("num_experts", 0)), moe_top_k=int(moe.get("top_k", 0)),
            moe_normalization_mode=int(moe.get("normalization_mode", 1)),
            quant_algo=quant.get("quant_algo"), kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
            mapping=mapping,
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1
