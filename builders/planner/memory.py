"""Per-GPU memory: weights, activation workspace, KV cache, and the tokens and sequences that fit.

TensorRT-LLM sizes the KV cache last: after the engine's weights and activation buffers are allocated,
`kv_cache_free_gpu_mem_fraction` of what is left becomes KV blocks. We follow the same order.

Activation workspace (an estimate; TensorRT reuses one set of buffers across layers):
    max_num_tokens * act_bytes * (4*H + attention width + FFN width)      per-token activations
  + max_batch_size * max_beam_width * V_pad * 4                          float32 logits (gathered)
  + RUNTIME_RESERVED_BYTES                                               CUDA context, cuBLAS, NCCL
where the attention width counts q, k, v and the attention output on this rank, and the FFN width the
two gated branches (MoE: top_k experts' branches at worst, plus shared experts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from enginesmith.builders.planner.hardware import GIB
from enginesmith.builders.mapping import Mapping, kv_heads_per_rank, pad_vocab_size
from enginesmith.builders.model_spec import DTYPE_BYTES, ModelSpec
from enginesmith.builders.planner.weights import Shard, global_shards, layer_shards

RUNTIME_RESERVED_BYTES = 1 * GIB


@dataclass(frozen=True, slots=True)
class MemoryInputs:
    """The recipe values memory depends on."""

    dtype: str
    weights: str
    kv_cache: str
    gpu_memory_bytes: int
    max_batch_size: int
    max_beam_width: int
    max_num_tokens: int
    max_seq_len: int
    tokens_per_block: int
    kv_fraction: float

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes(self) -> int:
        return 1 if self.kv_cache == "fp8" else self.act_bytes


@dataclass(frozen=True, slots=True)
class RankMemory:
    """One GPU's memory budget, in bytes."""

    weight_bytes: int
    weights_by_component: dict[str, int]
    workspace_bytes: int
    free_bytes: int
    """GPU memory minus weights minus workspace (negative: does not fit)."""
    kv_bytes_per_token: int
    kv_budget_bytes: int
    kv_tokens: int
    """Tokens of KV cache this GPU holds (whole blocks)."""
    kv_sequences: int
    """Sequences of max_seq_len that fit."""

    @property
    def fits(self) -> bool:
        return self.free_bytes > 0 and self.kv_sequences >= 1


def _layer_totals(spec: ModelSpec, m: Mapping, moe: bool, measure: Callable[[Shard], int]) -> dict[str, int]:
    """`measure` summed by component over one MoE layer (the first one) or one dense layer (layer 0)."""
    out: dict[str, int] = {}
    for s in layer_shards(spec, spec.first_k_dense_replace if moe else 0, m):
        out[s.component] = out.get(s.component, 0) + measure(s)
    return out


def stage_totals(spec: ModelSpec, m: Mapping, pp_rank: int, layers: list[int],
                 measure: Callable[[Shard], int]) -> dict[str, int]:
    """`measure` (bytes or elements) summed by component over one rank of PP stage `pp_rank`.

    All TP ranks of a stage hold tensors of the same sizes, so one evaluation serves the whole stage.
    """
    out: dict[str, int] = {}
    for s in global_shards(spec, m, pp_rank):
        out[s.component] = out.get(s.component, 0) + measure(s)
    n_moe = sum(1 for i in layers if spec.is_moe_layer(i))
    for moe, count in ((True, n_moe), (False, len(layers) - n_moe)):
        if count:
            for comp, v in _layer_totals(spec, m, moe, measure).items():
                out[comp] = out.get(comp, 0) + v * count
    return out


def stage_weight_bytes(spec: ModelSpec, m: Mapping, pp_rank: int, layers: list[int], weights: str,
                       act_bytes: int) -> dict[str, int]:
    """Weight bytes by component on any rank of PP stage `pp_rank`."""
    return stage_totals(spec, m, pp_rank, layers, lambda s: s.nbytes(weights, act_bytes))


def attention_width(spec: ModelSpec, tp: int) -> int:
    """Per-token activation elements of one attention block on a rank: q, k, v (or MLA's pieces) and output."""
    nh = spec.num_attention_heads // tp
    if spec.is_mla:
        qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        return (spec.q_lora_rank + nh * qk + spec.kv_lora_rank + spec.qk_rope_head_dim
                + nh * (spec.qk_nope_head_dim + spec.v_head_dim) + nh * spec.v_head_dim)
    kv = kv_heads_per_rank(spec.num_key_value_heads, tp)
    return (nh + 2 * kv) * spec.head_dim + nh * spec.head_dim


def ffn_width(spec: ModelSpec, m: Mapping) -> int:
    """Per-token activation elements of the widest FFN on a rank (gated: two branches)."""
    dense = 2 * spec.intermediate_size // m.tp_size if (not spec.is_moe or spec.first_k_dense_replace) else 0
    if not spec.is_moe:
        return dense
    moe = 2 * spec.num_experts_per_tok * spec.moe_intermediate_size // m.moe_tp_size
    moe += 2 * spec.shared_expert_intermediate_size // m.tp_size
    return max(dense, moe)


def workspace_bytes(spec: ModelSpec, m: Mapping, x: MemoryInputs) -> int:
    """Activation buffers + logits + runtime reserve (see the module docstring)."""
    per_token = 4 * spec.hidden_size + attention_width(spec, m.tp_size) + ffn_width(spec, m)
    logits = x.max_batch_size * x.max_beam_width * pad_vocab_size(spec.vocab_size, m.tp_size) * 4
    return x.max_num_tokens * x.act_bytes * per_token + logits + RUNTIME_RESERVED_BYTES


def kv_bytes_per_token(spec: ModelSpec, tp: int, num_layers: int, kv_bytes: int) -> int:
    """KV bytes per token on one rank: its layers' K and V heads, or the MLA latent (replicated over TP)."""
    if spec.is_mla:
        return num_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim) * kv_bytes
    return num_layers * 2 * kv_heads_per_rank(spec.num_key_value_heads, tp) * spec.head_dim * kv_bytes


def rank_memory(spec: ModelSpec, m: Mapping, pp_rank: int, layers: list[int], x: MemoryInputs) -> RankMemory:
    """The memory budget of any GPU of PP stage `pp_rank`."""
    by = stage_weight_bytes(spec, m, pp_rank, layers, x.weights, x.act_bytes)
    weights = sum(by.values())
    work = workspace_bytes(spec, m, x)
    free = x.gpu_memory_bytes - weights - work
    per_token = kv_bytes_per_token(spec, m.tp_size, len(layers), x.kv_bytes)
    budget = max(0, int(free * x.kv_fraction))
    tokens = budget // per_token // x.tokens_per_block * x.tokens_per_block if per_token else 0
    return RankMemory(weight_bytes=weights, weights_by_component=by, workspace_bytes=work, free_bytes=free,
                      kv_bytes_per_token=per_token, kv_budget_bytes=budget, kv_tokens=tokens,
                      kv_sequences=tokens // x.max_seq_len)
