"""Every weight tensor of a model as TensorRT-LLM lays it out on one rank.

This one shape table drives both the parameter counts (at tp = pp = ep = 1) and the per-GPU weight
bytes of a plan, so the two can never disagree. Shapes follow TensorRT-LLM's sharding rules:
fused qkv holds nh/tp query heads and ceil(nkv/tp) KV heads (duplicated when tp > nkv), dense MLP and
shared experts split by tp, routed experts by moe_ep (whole experts) and moe_tp (their width), the
router stays replicated in float32, the embedding table is whole on every first-stage rank
(use_parallel_embedding=false) and lm_head holds ceil(V/tp) rows (vocab padded to a multiple of tp).
MLA (DeepSeek-V3/Kimi-K2): q_a / kv_a projections are replicated, q_b / kv_b / o split by heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from enginesmith.builders.mapping import Mapping, kv_heads_per_rank, pad_vocab_size
from enginesmith.builders.model_spec import ModelSpec

ShardKind = Literal["linear", "embedding", "head", "norm", "bias", "router"]
QUANT_WEIGHT_BYTES = {"fp8": 1.0, "int8_weight_only": 1.0, "int4_weight_only": 0.5}
FP8_SCALES_BYTES = 8  # weights_scaling_factor + activation_scaling_factor, float32 each


@dataclass(frozen=True, slots=True)
class Shard:
    """One tensor's slice on one rank."""

    component: str
    """attention | mlp | experts | shared_experts | router | norms | embedding | lm_head"""
    numel: int
    kind: ShardKind
    rows: int = 0
    """Output channels on this rank (a weight-only per-channel scale per row); linear weights only."""
    shared: bool = False
    """Duplicate of another tensor (a tied lm_head): takes memory, is not a parameter."""

    def nbytes(self, weights: str, act_bytes: int) -> int:
        """Bytes on the GPU: quantizable linears follow `weights`, routers are float32, the rest `act_bytes`."""
        if self.kind == "router":
            return self.numel * 4
        if self.kind != "linear" or weights == "none":
            return self.numel * act_bytes
        body = int(self.numel * QUANT_WEIGHT_BYTES[weights])
        return body + (FP8_SCALES_BYTES if weights == "fp8" else self.rows * act_bytes)


def attention_shards(spec: ModelSpec, tp: int) -> list[Shard]:
    """Attention weights of one layer on one TP rank."""
    if spec.is_mla:
        return _mla_shards(spec, tp)
    h, d = spec.hidden_size, spec.head_dim
    nh, kv = spec.num_attention_heads // tp, kv_heads_per_rank(spec.num_key_value_heads, tp)
    qkv_rows = (nh + 2 * kv) * d
    out = [Shard("attention", qkv_rows * h, "linear", qkv_rows),  # qkv [(nh/tp + 2*ceil(nkv/tp))*d, H]
           Shard("attention", h * nh * d, "linear", h)]  # dense [H, nh*d/tp]
    if spec.attn_bias:
        out.append(Shard("attention", qkv_rows, "bias"))
    return out


def _mla_shards(spec: ModelSpec, tp: int) -> list[Shard]:
    h, nh = spec.hidden_size, spec.num_attention_heads // tp
    qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    kv_a = spec.kv_lora_rank + spec.qk_rope_head_dim
    kv_b = nh * (spec.qk_nope_head_dim + spec.v_head_dim)
    if spec.q_lora_rank:
        out = [Shard("attention", spec.q_lora_rank * h, "linear", spec.q_lora_rank),  # q_a_proj, replicated
               Shard("norms", spec.q_lora_rank, "norm"),
               Shard("attention", nh * qk * spec.q_lora_rank, "linear", nh * qk)]  # q_b_proj
    else:
        out = [Shard("attention", nh * qk * h, "linear", nh * qk)]
    return out + [
        Shard("attention", kv_a * h, "linear", kv_a),  # kv_a_proj_with_mqa, replicated
        Shard("norms", spec.kv_lora_rank, "norm"),
        Shard("attention", kv_b * spec.kv_lora_rank, "linear", kv_b),  # kv_b_proj
        Shard("attention", h * nh * spec.v_head_dim, "linear", h),  # o_proj
    ]


def ffn_shards(spec: ModelSpec, layer: int, m: Mapping) -> list[Shard]:
    """Dense MLP, or router + routed experts + shared experts, of one layer on one rank."""
    h = spec.hidden_size
    if not spec.is_moe_layer(layer):
        i = spec.intermediate_size // m.tp_size
        return [Shard("mlp", 2 * i * h, "linear", 2 * i),  # fc (gate_proj) + gate (up_proj) [I/tp, H]
                Shard("mlp", h * i, "linear", h)]  # proj [H, I/tp]
    e, i = spec.num_experts // m.moe_ep_size, spec.moe_intermediate_size // m.moe_tp_size
    out = [Shard("router", spec.num_experts * h, "router"),
           Shard("experts", e * 2 * i * h, "linear", e * 2 * i),  # fc [E/ep, 2*I/moe_tp, H]
           Shard("experts", e * h * i, "linear", e * h)]  # proj [E/ep, H, I/moe_tp]
    if spec.router_bias:
        out.append(Shard("router", spec.num_experts, "router"))
    if spec.n_shared_experts:
        s = spec.shared_expert_intermediate_size // m.tp_size
        out += [Shard("shared_experts", 2 * s * h, "linear", 2 * s), Shard("shared_experts", h * s, "linear", h)]
    return out


def layer_shards(spec: ModelSpec, layer: int, m: Mapping) -> list[Shard]:
    """All weights of global layer `layer` on a rank of mapping `m`."""
    norms = [Shard("norms", spec.hidden_size, "norm"), Shard("norms", spec.hidden_size, "norm")]
    return attention_shards(spec, m.tp_size) + ffn_shards(spec, layer, m) + norms


def global_shards(spec: ModelSpec, m: Mapping, pp_rank: int) -> list[Shard]:
    """Embedding (first stage), ln_f and lm_head (last stage) on one rank."""
    h, out = spec.hidden_size, []
    if pp_rank == 0:
        out.append(Shard("embedding", spec.vocab_size * h, "embedding"))
    if pp_rank == m.pp_size - 1:
        rows = pad_vocab_size(spec.vocab_size, m.tp_size) // m.tp_size
        out += [Shard("norms", h, "norm"),
                Shard("lm_head", rows * h, "head", rows, shared=spec.tie_word_embeddings)]
    return out


def rank_shards(spec: ModelSpec, m: Mapping, pp_rank: int, layers: list[int]) -> list[Shard]:
    """Every tensor one rank of `m` holds."""
    return global_shards(spec, m, pp_rank) + [s for i in layers for s in layer_shards(spec, i, m)]


@dataclass(frozen=True, slots=True)
class ParamCounts:
    total: int
    active: int
    by_component: dict[str, int]


def param_counts(spec: ModelSpec) -> ParamCounts:
    """Unique parameters (tied lm_head counted once) and those active per token (top-k routed experts)."""
    by: dict[str, int] = {}
    for s in rank_shards(spec, Mapping(world_size=1), 0, list(range(spec.num_hidden_layers))):
        if not s.shared:
            by[s.component] = by.get(s.component, 0) + s.numel
    total = sum(by.values())
    experts = by.get("experts", 0)
    inactive = experts - experts * spec.num_experts_per_tok // spec.num_experts if spec.is_moe else 0
    return ParamCounts(total=total, active=total - inactive, by_component=by)
