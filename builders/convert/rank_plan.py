"""Per-rank read plans: which slices of which HF tensors make every tensor of `rank{N}.safetensors`.

A `TensorPlan` lists its `pieces` in row-major order of the output, so the rank file can be written
piece by piece: concatenating the flattened pieces gives the flattened tensor. Pure: shapes come from
the ModelSpec, not from the files (validation checks the files against the same expectations).
"""

from __future__ import annotations

from dataclasses import dataclass

from enginesmith.builders.convert import quantize, split
from enginesmith.builders.convert.weight_map import (
    FIRST_STAGE,
    HF_LAYER_PREFIX,
    TRT_LAYER_PREFIX,
    Rule,
    head_rules,
    hf_shape,
    layer_rules,
)
from enginesmith.builders.mapping import Mapping, RankCoords, ep_experts, pp_layers
from enginesmith.builders.model_spec import ModelSpec

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Read:
    """A slice of one HF tensor: `rows` along dim 0, `cols` along dim 1 (None = whole dimension)."""

    source: str
    shape: tuple[int, ...]
    """Shape of the slice."""
    rows: Span | None = None
    cols: Span | None = None


@dataclass(frozen=True, slots=True)
class Zeros:
    """Zero padding (lm_head rows past the vocab)."""

    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One output tensor: name, shape, dtype and the pieces that fill it in order."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Read | Zeros, ...]
    batch: int = 1
    """Number of stacked matrices (experts); pieces split evenly among them."""
    quant_algo: str | None = None
    """W8A16 / W4A16: stored as int8 `weight` + `per_channel_scale` (see quantize.py)."""

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of the tensors this plan writes, in file order."""
        if self.quant_algo is None:
            return [(self.name, self.dtype, self.shape)]
        wshape, sshape = quantize.quantized_shapes(self.shape, self.quant_algo)
        return [(self.name, "int8", wshape), (quantize.scale_name(self.name), self.dtype, sshape)]

    def sources(self) -> list[str]:
        return [p.source for p in self.pieces if isinstance(p, Read)]


def _rule_pieces(rule: Rule, hf_prefix: str, spec: ModelSpec, mapping: Mapping,
                 c: RankCoords) -> tuple[list[Read | Zeros], tuple[int, ...], int]:
    """Pieces, output shape and batch of one rule on one rank."""
    tp, r = mapping.tp_size, c.tp_rank
    srcs = rule.sources
    name = hf_prefix + srcs[0]
    full = hf_shape(srcs[0], spec)
    if rule.kind in ("replicate", "router"):
        return [Read(name, full)], full, 1
    if rule.kind == "column":
        rows = split.even_span(full[0], tp, r)
        return [Read(name, (rows[1] - rows[0], *full[1:]), rows=rows)], (rows[1] - rows[0], *full[1:]), 1
    if rule.kind == "row":
        cols = split.even_span(full[1], tp, r)
        return [Read(name, (full[0], cols[1] - cols[0]), cols=cols)], (full[0], cols[1] - cols[0]), 1
    if rule.kind == "qkv":
        d = spec.head_dim
        spans = [split.q_rows(spec.num_attention_heads, d, tp, r),
                 split.kv_rows(spec.num_key_value_heads, d, tp, r),
                 split.kv_rows(spec.num_key_value_heads, d, tp, r)]
        pieces = [Read(hf_prefix + s, (b - a, *hf_shape(s, spec)[1:]), rows=(a, b))
                  for s, (a, b) in zip(srcs, spans, strict=True)]
        return pieces, (sum(p.shape[0] for p in pieces), *full[1:]), 1
    if rule.kind == "vocab":
        (a, b), pad = split.vocab_rows(full[0], tp, r)
        pieces: list[Read | Zeros] = [Read(name, (b - a, full[1]), rows=(a, b))] if b > a else []
        pieces += [Zeros((pad, full[1]))] if pad else []
        return pieces, (b - a + pad, full[1]), 1
    experts = ep_experts(spec.num_experts, mapping.moe_ep_size, c.moe_ep_rank)
    i0, i1 = split.even_span(spec.moe_intermediate_size, mapping.moe_tp_size, c.moe_tp_rank)
    width = i1 - i0
    if rule.kind == "expert_fc":  # per expert: up (w3) rows, then gate (w1) rows
        pieces = [Read(hf_prefix + s.format(e=e), (width, spec.hidden_size), rows=(i0, i1))
                  for e in experts for s in srcs]
        return pieces, (len(experts), 2 * width, spec.hidden_size), len(experts)
    if rule.kind == "expert_proj":
        pieces = [Read(hf_prefix + srcs[0].format(e=e), (spec.hidden_size, width), cols=(i0, i1)) for e in experts]
        return pieces, (len(experts), spec.hidden_size, width), len(experts)
    raise AssertionError(f"unknown rule kind {rule.kind}")


def _plan(trt_name: str, rule: Rule, hf_prefix: str, spec: ModelSpec, mapping: Mapping, c: RankCoords,
          dtype: str, quant_algo: str | None) -> TensorPlan:
    pieces, shape, batch = _rule_pieces(rule, hf_prefix, spec, mapping, c)
    out_dtype = "float32" if rule.kind == "router" else dtype
    algo = quant_algo if quant_algo and quantize.is_quantized(trt_name) else None
    return TensorPlan(trt_name, shape, out_dtype, tuple(pieces), batch, algo)


def plan_rank(spec: ModelSpec, mapping: Mapping, rank: int, dtype: str,
              quant_algo: str | None = None) -> list[TensorPlan]:
    """Every tensor of `rank{rank}.safetensors`, in file order, with local layer indices."""
    c = mapping.rank_coords(rank)
    plans = []
    if c.pp_rank == 0:
        plans += [_plan(n, rule, "", spec, mapping, c, dtype, quant_algo) for n, rule in FIRST_STAGE.items()]
    rules = layer_rules(spec)
    for local, layer in enumerate(pp_layers(spec.num_hidden_layers, mapping.pp_size, c.pp_rank)):
        trt, hf = TRT_LAYER_PREFIX.format(i=local), HF_LAYER_PREFIX.format(i=layer)
        plans += [_plan(trt + n, rule, hf, spec, mapping, c, dtype, quant_algo) for n, rule in rules.items()]
    if c.pp_rank == mapping.pp_size - 1:
        plans += [_plan(n, rule, "", spec, mapping, c, dtype, quant_algo) for n, rule in head_rules(spec).items()]
    return plans


def referenced_sources(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model's weight map reads (all layers, all experts) -> expected shape."""
    out: dict[str, tuple[int, ...]] = {}
    for rule in FIRST_STAGE.values():
        out |= {s: hf_shape(s, spec) for s in rule.sources}
    for rule in head_rules(spec).values():
        out |= {s: hf_shape(s, spec) for s in rule.sources}
    experts = range(spec.num_experts) if spec.is_moe else range(0)
    for layer in range(spec.num_hidden_layers):
        prefix = HF_LAYER_PREFIX.format(i=layer)
        for rule in layer_rules(spec).values():
            for s in rule.sources:
                names = [s.format(e=e) for e in experts] if "{e}" in s else [s]
                out |= {prefix + n: hf_shape(s, spec) for n in names}
    return out
