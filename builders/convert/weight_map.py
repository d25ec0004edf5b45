"""Declarative Hugging Face -> TensorRT-LLM weight maps, one literal table per model family.

In the spirit of gpt-fast's `weight_map` and nano-vllm's `packed_modules_mapping`: each entry says which HF
tensors make one TensorRT-LLM tensor and how they are split. `rank_plan.py` turns a table into per-rank
read plans; nothing here touches tensors. Names: `shared/reference/trtllm-checkpoint-and-build.md` 2.2-2.6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from enginesmith.builders.model_spec import ModelSpec

RuleKind = Literal["replicate", "column", "row", "qkv", "vocab", "router", "expert_fc", "expert_proj"]


@dataclass(frozen=True, slots=True)
class Rule:
    """How one TensorRT-LLM tensor is made from HF tensors (names relative to the layer prefix)."""

    kind: RuleKind
    """replicate: whole tensor on every rank; column: split dim 0 by tp; row: split dim 1 by tp;
    qkv: per-rank [q; k; v] rows with KV-head duplication; vocab: lm_head rows padded to a multiple of tp;
    router: replicated, float32; expert_fc: [experts of this EP rank, up(w3) then gate(w1) sliced by moe_tp, H];
    expert_proj: [experts of this EP rank, H, w2 columns sliced by moe_tp]."""
    sources: tuple[str, ...]
    """HF tensor names; `{e}` stands for the expert index."""


ATTENTION: dict[str, Rule] = {
    "input_layernorm.weight": Rule("replicate", ("input_layernorm.weight",)),
    "attention.qkv.weight": Rule(
        "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "attention.dense.weight": Rule("row", ("self_attn.o_proj.weight",)),
    "post_layernorm.weight": Rule("replicate", ("post_attention_layernorm.weight",)),
}

QKV_BIAS: dict[str, Rule] = {
    "attention.qkv.bias": Rule("qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
}

# Naming trap: TensorRT-LLM's `fc` is the activated branch (HF gate_proj), its `gate` is HF up_proj.
GATED_MLP: dict[str, Rule] = {
    "mlp.fc.weight": Rule("column", ("mlp.gate_proj.weight",)),
    "mlp.gate.weight": Rule("column", ("mlp.up_proj.weight",)),
    "mlp.proj.weight": Rule("row", ("mlp.down_proj.weight",)),
}

MOE_MLP: dict[str, Rule] = {
    "mlp.router.weight": Rule("router", ("block_sparse_moe.gate.weight",)),
    "mlp.fc.weight": Rule(
        "expert_fc", ("block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w1.weight")),
    "mlp.proj.weight": Rule("expert_proj", ("block_sparse_moe.experts.{e}.w2.weight",)),
}

FIRST_STAGE: dict[str, Rule] = {
    "transformer.vocab_embedding.weight": Rule("replicate", ("model.embed_tokens.weight",)),
}

LAST_STAGE: dict[str, Rule] = {
    "transformer.ln_f.weight": Rule("replicate", ("model.norm.weight",)),
    "lm_head.weight": Rule("vocab", ("lm_head.weight",)),
}

FAMILY_LAYERS: dict[str, dict[str, Rule]] = {
    "llama": ATTENTION | GATED_MLP,
    "qwen2": ATTENTION | QKV_BIAS | GATED_MLP,
    "mixtral": ATTENTION | MOE_MLP,
}

HF_LAYER_PREFIX = "model.layers.{i}."
TRT_LAYER_PREFIX = "transformer.layers.{i}."

# Expected HF shapes in symbols resolved by `dims()`; validation compares the source against these.
HF_SHAPES: dict[str, tuple[str, ...]] = {
    "model.embed_tokens.weight": ("V", "H"),
    "lm_head.weight": ("V", "H"),
    "model.norm.weight": ("H",),
    "input_layernorm.weight": ("H",),
    "post_attention_layernorm.weight": ("H",),
    "self_attn.q_proj.weight": ("Q", "H"),
    "self_attn.k_proj.weight": ("KV", "H"),
    "self_attn.v_proj.weight": ("KV", "H"),
    "self_attn.q_proj.bias": ("Q",),
    "self_attn.k_proj.bias": ("KV",),
    "self_attn.v_proj.bias": ("KV",),
    "self_attn.o_proj.weight": ("H", "Q"),
    "mlp.gate_proj.weight": ("I", "H"),
    "mlp.up_proj.weight": ("I", "H"),
    "mlp.down_proj.weight": ("H", "I"),
    "block_sparse_moe.gate.weight": ("E", "H"),
    "block_sparse_moe.experts.{e}.w1.weight": ("IE", "H"),
    "block_sparse_moe.experts.{e}.w3.weight": ("IE", "H"),
    "block_sparse_moe.experts.{e}.w2.weight": ("H", "IE"),
}

# HF tensors that carry no weights TensorRT-LLM needs (buffers saved by old transformers versions).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def dims(spec: ModelSpec) -> dict[str, int]:
    """Values of the shape symbols for one model."""
    return {
        "V": spec.vocab_size, "H": spec.hidden_size, "I": spec.intermediate_size,
        "Q": spec.num_attention_heads * spec.head_dim, "KV": spec.num_key_value_heads * spec.head_dim,
        "E": spec.num_experts, "IE": spec.moe_intermediate_size,
    }


def hf_shape(template: str, spec: ModelSpec) -> tuple[int, ...]:
    """Expected shape of an HF tensor given its layer-relative (or global) template."""
    d = dims(spec)
    return tuple(d[s] for s in HF_SHAPES[template])


def layer_rules(spec: ModelSpec) -> dict[str, Rule]:
    """The per-layer table for this model (llama-family models with attention_bias get the qkv bias)."""
    rules = dict(FAMILY_LAYERS[spec.family])
    if spec.attn_bias:
        rules |= QKV_BIAS
    return rules


def head_rules(spec: ModelSpec) -> dict[str, Rule]:
    """Last-stage table; with tied embeddings lm_head comes from the embedding (unified converter's custom_dict)."""
    if spec.tie_word_embeddings:
        return LAST_STAGE | {"lm_head.weight": Rule("vocab", ("model.embed_tokens.weight",))}
    return dict(LAST_STAGE)
