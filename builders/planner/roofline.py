"""Roofline floors and step-time estimates for prefill and decode on a layout.

Per PP stage: FLOPs = 2 * tokens * (dense params + routed-expert params * top_k / num_experts) + the
attention core (4 * heads * head_dim per attended position; MLA: 2 * heads * (2 * kv_lora + rope)) + the
lm_head for one token per sequence; HBM bytes = weights read once per micro-batch (routed experts only
the fraction 1-(1-k/E)^tokens that any token touches) + KV read and written. The floor is
max(FLOPs / peak, bytes / HBM bandwidth); the estimate divides by the achievable fractions and adds a
fixed time per layer per micro-batch (the small kernels' minimum times) and the stage's communication
(builders.planner.comms, as the recipe's build target runs it, latency per operation included). Constants:
builders.planner.perf_constants.

KV-cache reuse: a prompt whose first `cached` tokens are served from the prefix cache computes the other
isl - cached tokens only, attending over the whole prompt and reading the cached K/V from HBM.

Pipelines: prefill of one request walks the stages in turn. Decode keeps pp_size micro-batches in flight
(TensorRT-LLM's in-flight batching with PP), so TPOT = max(sum of stage times + sends,
micro-batches * slowest stage). A burst of prompts split into m micro-batches runs GPipe-style:
sum of stage times + (m-1) * slowest stage, idle fraction (p-1)/(m+p-1) when micro-batches cost nothing
of their own; each pays the stage's fixed layer time, so past an optimum more micro-batches get slower.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from enginesmith.builders.planner.comms import CommFigure, merge, p2p_comm, stage_comm
from enginesmith.builders.planner.hardware import HardwareSpec
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.planner.perf_constants import (
    COMPUTE_EFFICIENCY,
    HBM_EFFICIENCY,
    LAYER_FIXED_US,
    MULTI_TOKEN_LAYER_FIXED_US,
)


@dataclass(frozen=True, slots=True)
class StageShape:
    """What the performance model needs about one PP stage (any of its TP ranks)."""

    pp_rank: int
    layers: list[int]
    params: dict[str, int]
    """Elements by component on one rank."""
    weight_bytes: dict[str, int]
    kv_bytes_per_token: int


@dataclass(frozen=True, slots=True)
class StageCost:
    compute_s: float
    hbm_s: float
    comm_s: float
    flops: float
    hbm_bytes: float
    comm: list[CommFigure] = field(default_factory=list)
    fixed_s: float = 0.0
    """The layers' fixed kernel time (LAYER_FIXED_US each, plus MULTI_TOKEN_LAYER_FIXED_US for a micro-batch of
    more than one token), paid by every micro-batch."""

    @property
    def floor_s(self) -> float:
        return max(self.compute_s, self.hbm_s)

    @property
    def estimate_s(self) -> float:
        return max(self.compute_s / COMPUTE_EFFICIENCY, self.hbm_s / HBM_EFFICIENCY) + self.fixed_s + self.comm_s


@dataclass(frozen=True, slots=True)
class PhaseEstimate:
    """One kind of step on the whole pipeline."""

    phase: str
    """prefill (one request) | decode (the SLA batch) | prefill_burst (the SLA batch's prompts at once)."""
    tokens: int
    sequences: int
    micro_batches: int
    flops_per_gpu: float
    """Busiest GPU, whole step."""
    hbm_bytes_per_gpu: float
    compute_ms: float
    """The step if only compute counted (stages' compute floors through the pipeline)."""
    hbm_ms: float
    """The step if only HBM traffic counted."""
    floor_ms: float
    """Roofline floor of the step: pipeline of max(compute, HBM) per stage, communication excluded."""
    comm_ms: float
    estimate_ms: float
    """Expected step time: achievable fractions of peak, fixed layer time, communication and the pipeline."""
    bound_by: str
    """compute | memory bandwidth | communication (the fixed layer time is no bound of its own)."""
    comm: list[CommFigure]
    fixed_ms: float = 0.0
    """Fixed layer time in the step (all stages, every micro-batch)."""
    target: str = "trtllm-engine"
    """Build target whose communication `comm` lists (builders.planner.comms.TARGET_COMMS)."""
    cached_tokens: int = 0
    """Prefill: prompt tokens per sequence served from the KV cache (reuse), not in `tokens`."""


def layer_fixed_us(tokens: int) -> float:
    """Fixed time of one layer for a micro-batch of `tokens` tokens (perf_constants)."""
    return LAYER_FIXED_US + (MULTI_TOKEN_LAYER_FIXED_US if tokens > 1 else 0.0)


def attended_positions(isl: int, cached: int = 0) -> float:
    """Causal attention of prompt positions cached+1..isl: each attends to every position up to its own."""
    return (isl * (isl + 1) - cached * (cached + 1)) / 2


def _pipeline(times: list[float], m: int, p2p: float, inflight: bool) -> float:
    if inflight:
        return max(sum(times) + p2p, m * max(times))
    return sum(times) + p2p + (m - 1) * max(times)


@dataclass(frozen=True, slots=True)
class PerfModel:
    spec: ModelSpec
    mapping: Mapping
    hw: HardwareSpec
    stages: list[StageShape]
    act_bytes: int
    compute_dtype: str
    target: str = "trtllm-engine"
    """Build target whose communication is priced (builders.planner.comms)."""

    def stage_cost(self, st: StageShape, tokens: int, seqs: int, attended: float, kv_read: float) -> StageCost:
        """Cost of one micro-batch on stage `st`."""
        spec, k, e = self.spec, self.spec.num_experts_per_tok, self.spec.num_experts
        p, w = st.params, st.weight_bytes
        dense = sum(v for c, v in p.items() if c in ("attention", "mlp", "shared_experts", "router"))
        routed = p.get("experts", 0) * k / e if spec.is_moe else 0.0
        nh = spec.num_attention_heads // self.mapping.tp_size
        per_pos = 2 * nh * (2 * spec.kv_lora_rank + spec.qk_rope_head_dim) if spec.is_mla else 4 * nh * spec.head_dim
        flops = 2 * tokens * (dense + routed) + 2 * seqs * p.get("lm_head", 0) + per_pos * attended * len(st.layers)
        touched = 1 - (1 - k / e) ** tokens if spec.is_moe else 0.0
        weights = sum(v for c, v in w.items() if c not in ("embedding", "experts")) + w.get("experts", 0) * touched
        embed_rows = tokens * spec.hidden_size * self.act_bytes if "embedding" in w else 0
        nbytes = weights + embed_rows + (kv_read + tokens) * st.kv_bytes_per_token
        comm = stage_comm(spec, self.mapping, self.hw, st.pp_rank, st.layers, tokens, seqs, self.act_bytes)
        return StageCost(compute_s=flops / self.hw.peak_flops(self.compute_dtype),
                         hbm_s=nbytes / (self.hw.hbm_gbps * 1e9), comm_s=sum(c.time_s for c in comm),
                         flops=flops, hbm_bytes=nbytes, comm=comm,
                         fixed_s=len(st.layers) * layer_fixed_us(tokens) * 1e-6)

    def stage_costs(self, tokens: int, seqs: int, attended: float, kv_read: float, m: int) -> list[StageCost]:
        """Every stage's cost for one of `m` micro-batches of the step."""
        return [self.stage_cost(st, -(-tokens // m), -(-seqs // m), attended / m, kv_read / m)
                for st in self.stages]

    def phase(self, name: str, tokens: int, seqs: int, attended: float, kv_read: float, m: int,
              inflight: bool) -> PhaseEstimate:
        """A step of `tokens` from `seqs` sequences, split into `m` micro-batches."""
        costs = self.stage_costs(tokens, seqs, attended, kv_read, m)
        p2p = p2p_comm(self.spec, self.mapping, self.hw, -(-tokens // m), -(-seqs // m), self.act_bytes,
                       self.target)
        p2p_s = sum(f.time_s for f in p2p)
        floor = _pipeline([c.floor_s for c in costs], m, 0.0, inflight)
        estimate = _pipeline([c.estimate_s for c in costs], m, p2p_s, inflight)
        shares = {"compute": 0.0, "memory bandwidth": 0.0, "communication": p2p_s}
        for c in costs:
            c_s, h_s = c.compute_s / COMPUTE_EFFICIENCY, c.hbm_s / HBM_EFFICIENCY
            shares["compute" if c_s >= h_s else "memory bandwidth"] += max(c_s, h_s)
            shares["communication"] += c.comm_s
        comm = merge([f for c in costs for f in c.comm] + p2p)
        return PhaseEstimate(
            phase=name, tokens=tokens, sequences=seqs, micro_batches=m,
            flops_per_gpu=max(c.flops for c in costs) * m, hbm_bytes_per_gpu=max(c.hbm_bytes for c in costs) * m,
            compute_ms=1e3 * _pipeline([c.compute_s for c in costs], m, 0.0, inflight),
            hbm_ms=1e3 * _pipeline([c.hbm_s for c in costs], m, 0.0, inflight),
            floor_ms=1e3 * floor, comm_ms=1e3 * (sum(c.comm_s for c in costs) + p2p_s),
            estimate_ms=1e3 * estimate, bound_by=max(shares, key=shares.__getitem__), comm=comm,
            fixed_ms=1e3 * m * sum(c.fixed_s for c in costs), target=self.target)

    def prefill(self, isl: int, cached: int = 0) -> PhaseEstimate:
        """One request's prompt (TTFT), its first `cached` tokens from the KV cache."""
        est = self.phase("prefill", isl - cached, 1, attended_positions(isl, cached), cached, 1, inflight=False)
        return replace(est, cached_tokens=cached)

    def decode(self, batch: int, context: float) -> PhaseEstimate:
        """One token for each of `batch` sequences holding `context` tokens (TPOT)."""
        m = max(1, min(self.mapping.pp_size, batch))
        return self.phase("decode", batch, batch, batch * context, batch * context, m, inflight=True)

    def prefill_burst(self, batch: int, isl: int, micro_batches: int, cached: int = 0) -> PhaseEstimate:
        """`batch` prompts at once through a GPipe of `micro_batches`, each with `cached` tokens from the cache."""
        m = max(1, min(micro_batches, batch))
        est = self.phase("prefill_burst", batch * (isl - cached), batch, batch * attended_positions(isl, cached),
                         batch * cached, m, inflight=False)
        return replace(est, cached_tokens=cached)

    def burst_stage(self, batch: int, isl: int, cached: int = 0) -> tuple[float, float]:
        """(work, per-micro-batch fixed time) in seconds of the slowest stage for a burst in one micro-batch."""
        slowest = max(self.stage_costs(batch * (isl - cached), batch, batch * attended_positions(isl, cached),
                                       batch * cached, 1),
                      key=lambda c: c.estimate_s)
        return slowest.estimate_s - slowest.fixed_s, slowest.fixed_s


def bubble_fraction(pp_size: int, micro_batches: int, per_micro_s: float = 0.0, stage_s: float = 1.0) -> float:
    """Share of a GPipe step that is not one stage's work for the whole batch: 1 - (T + c) / ((m+p-1)(T/m + c)).

    T = `stage_s` (one stage's work for the batch), c = `per_micro_s` (what each micro-batch costs on top).
    With c = 0 this is the idle fraction (p-1)/(m+p-1); with c > 0 it grows again past the best m.
    """
    m, p, c, t = micro_batches, pp_size, per_micro_s, stage_s
    return 1 - (t + c) / ((m + p - 1) * (t / m + c))


def best_micro_batches(pp_size: int, stage_s: float, per_micro_s: float, cap: int) -> int:
    """The m in 1..cap that minimises the GPipe step (m+p-1)(T/m + c); near sqrt((p-1) T / c)."""
    return min(range(1, max(1, cap) + 1), key=lambda m: ((m + pp_size - 1) * (stage_s / m + per_micro_s), m))
