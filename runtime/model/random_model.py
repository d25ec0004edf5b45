"""Random-weight RankModels of real shapes, built in device memory (no checkpoint file).

Benchmarks need a Llama-3-8B or a Mixtral-shaped model on the GPU without writing 16 GB to disk.
`random_rank_model(cfg, rank)` fills every tensor a rank file of `cfg` would hold with seeded random
values and hands them to RankModel's constructor. Each full (unsplit) tensor gets its own seed, and a
rank takes its slice with TensorRT-LLM's split rules, so the ranks of a tp=2 model together compute
exactly what the tp=1 model with the same seed computes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch

from enginesmith.builders.mapping import RankCoords, ep_experts, kv_head_of_rank, pad_vocab_size, pp_layers
from enginesmith.runtime.model.checkpoint import CheckpointConfig
from enginesmith.runtime.model.model import RankModel

TensorFactory = Callable[[str, tuple[int, ...]], torch.Tensor]
"""(name, full shape) -> tensor; names are TensorRT-LLM's with the global layer index."""

LLAMA_3_8B: dict[str, Any] = dict(
    architecture="LlamaForCausalLM", dtype="bfloat16", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_size=128, intermediate_size=14336, norm_epsilon=1e-5,
    rotary_base=500000.0, max_position_embeddings=8192)
LLAMA_3_70B: dict[str, Any] = LLAMA_3_8B | dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                                intermediate_size=28672)
MIXTRAL_8X7B: dict[str, Any] = dict(
    architecture="MixtralForCausalLM", dtype="bfloat16", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_size=128, intermediate_size=14336, norm_epsilon=1e-5,
    rotary_base=1e6, max_position_embeddings=32768, moe={"num_experts": 8, "top_k": 2, "normalization_mode": 1})
TINY_LLAMA: dict[str, Any] = dict(
    architecture="LlamaForCausalLM", dtype="float32", vocab_size=256, hidden_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_size=16, intermediate_size=128, norm_epsilon=1e-5,
    rotary_base=10000.0, max_position_embeddings=1024)
TINY_MIXTRAL: dict[str, Any] = TINY_LLAMA | dict(architecture="MixtralForCausalLM", intermediate_size=96,
                                                 moe={"num_experts": 4, "top_k": 2, "normalization_mode": 1})


def checkpoint_config(shape: dict[str, Any], *, num_layers: int | None = None, dtype: str | None = None,
                      tp_size: int = 1, pp_size: int = 1, moe_ep_size: int = 1) -> CheckpointConfig:
    """A CheckpointConfig for one of the shapes above, optionally trimmed to `num_layers` and split."""
    raw = dict(shape)
    raw["num_hidden_layers"] = num_layers or raw["num_hidden_layers"]
    raw["dtype"] = dtype or raw["dtype"]
    raw["mapping"] = dict(world_size=tp_size * pp_size, tp_size=tp_size, pp_size=pp_size,
                          moe_ep_size=moe_ep_size, moe_tp_size=tp_size // moe_ep_size)
    return CheckpointConfig.from_dict(raw)


def seeded_normal(seed: int, device: torch.device | str, dtype: torch.dtype, std: float = 0.02) -> TensorFactory:
    """Factory drawing N(0, std) per tensor (norm weights: 1 + N(0, std)), seeded by seed and name."""

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        out_dtype = torch.float32 if name.endswith("router.weight") else dtype
        t = torch.empty(shape, dtype=out_dtype, device=device)
        t.normal_(0.0, std, generator=gen)
        if name.endswith(("layernorm.weight", "ln_f.weight")):
            t.add_(1.0)
        return t

    return make


def random_rank_model(cfg: CheckpointConfig, rank: int = 0, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None, seed: int = 0,
                      factory: TensorFactory | None = None) -> RankModel:
    """RankModel of `rank` with random weights (or `factory`'s), sliced as the converter slices them."""
    dtype = dtype or {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
    device = torch.device(device)
    make = factory or seeded_normal(seed, device, dtype)
    coords = cfg.mapping.rank_coords(rank)
    tensors = _rank_tensors(cfg, coords, make)
    return RankModel(cfg, coords, tensors, device, dtype)


def weight_bytes_per_token(model: RankModel) -> int:
    """Bytes of weights one decode token reads on this rank (MoE: its top-k experts; embedding: one row)."""
    total = model.lm_head.numel() * model.lm_head.element_size() if model.is_last_stage else 0
    total += model.ln_f.numel() * model.ln_f.element_size() if model.is_last_stage else 0
    total += model.embedding[0].numel() * model.embedding.element_size() if model.is_first_stage else 0
    for w in model.layers:
        for t in (w.input_layernorm, w.qkv, w.qkv_bias, w.dense, w.post_layernorm, w.gate, w.router):
            total += 0 if t is None else t.numel() * t.element_size()
        expert_share = model.cfg.moe_top_k / len(model.experts) if w.router is not None else 1.0
        total += int((w.fc.numel() * w.fc.element_size() + w.proj.numel() * w.proj.element_size()) * expert_share)
    return total


def _rank_tensors(cfg: CheckpointConfig, c: RankCoords, make: TensorFactory) -> dict[str, torch.Tensor]:
    m = cfg.mapping
    h, d, inter = cfg.hidden_size, cfg.head_size, cfg.intermediate_size
    out: dict[str, torch.Tensor] = {}
    if c.pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = make("transformer.vocab_embedding.weight", (cfg.vocab_size, h))
    if c.pp_rank == m.pp_size - 1:
        out["transformer.ln_f.weight"] = make("transformer.ln_f.weight", (h,))
        head = make("lm_head.weight", (cfg.vocab_size, h))
        per = pad_vocab_size(cfg.vocab_size, m.tp_size) // m.tp_size
        rows = head[c.tp_rank * per: (c.tp_rank + 1) * per]
        pad = per - rows.shape[0]
        out["lm_head.weight"] = torch.cat([rows, rows.new_zeros(pad, h)]) if pad else _own(rows)
    for local, g in enumerate(pp_layers(cfg.num_hidden_layers, m.pp_size, c.pp_rank)):
        name = f"transformer.layers.{g}."
        for k, t in _layer_tensors(cfg, c, name, make, h, d, inter).items():
            out[f"transformer.layers.{local}.{k}"] = t
    return out


def _layer_tensors(cfg: CheckpointConfig, c: RankCoords, p: str, make: TensorFactory, h: int, d: int,
                   inter: int) -> dict[str, torch.Tensor]:
    tp, r = cfg.mapping.tp_size, c.tp_rank
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    q = make(p + "attention.q.weight", (nq * d, h))
    k = make(p + "attention.k.weight", (nkv * d, h))
    v = make(p + "attention.v.weight", (nkv * d, h))
    q_local = nq // tp
    kv_first = r * nkv // tp if nkv >= tp else kv_head_of_rank(nkv, tp, r)
    kv_local = max(1, nkv // tp)
    qs, kvs = slice(r * q_local * d, (r + 1) * q_local * d), slice(kv_first * d, (kv_first + kv_local) * d)
    t = {
        "input_layernorm.weight": make(p + "input_layernorm.weight", (h,)),
        "attention.qkv.weight": torch.cat([q[qs], k[kvs], v[kvs]]),
        "attention.dense.weight": _own(make(p + "attention.dense.weight", (h, nq * d))[:, qs]),
        "post_layernorm.weight": make(p + "post_layernorm.weight", (h,)),
    }
    if cfg.attn_bias:
        qb, kb, vb = (make(p + f"attention.{n}.bias", (s,)) for n, s in (("q", nq * d), ("k", nkv * d), ("v", nkv * d)))
        t["attention.qkv.bias"] = torch.cat([qb[qs], kb[kvs], vb[kvs]])
    if not cfg.is_moe:
        cols = slice(r * inter // tp, (r + 1) * inter // tp)
        t["mlp.fc.weight"] = _own(make(p + "mlp.fc.weight", (inter, h))[cols])
        t["mlp.gate.weight"] = _own(make(p + "mlp.gate.weight", (inter, h))[cols])
        t["mlp.proj.weight"] = _own(make(p + "mlp.proj.weight", (h, inter))[:, cols])
        return t
    mtp, mr = cfg.mapping.moe_tp_size, c.moe_tp_rank
    cols = slice(mr * inter // mtp, (mr + 1) * inter // mtp)
    fc, proj = [], []
    for e in ep_experts(cfg.num_experts, cfg.mapping.moe_ep_size, c.moe_ep_rank):
        up, gate = make(p + f"mlp.experts.{e}.up", (inter, h)), make(p + f"mlp.experts.{e}.gate", (inter, h))
        fc.append(torch.cat([up[cols], gate[cols]]))
        proj.append(make(p + f"mlp.experts.{e}.proj", (h, inter))[:, cols])
    t["mlp.router.weight"] = make(p + "mlp.router.weight", (cfg.num_experts, h))
    t["mlp.fc.weight"] = torch.stack(fc)
    t["mlp.proj.weight"] = torch.stack(proj)
    return t


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if it spans its whole storage, else a compact copy (a slice must not pin the full tensor)."""
    whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.contiguous().clone() if t.is_contiguous() else t.contiguous()
