"""Measured prefill FLOP/s and decode bytes/s against the plan's roofline floors.

`PlanRef` holds the few per-GPU figures the comparison needs, read from a `builders.planner.plan.Plan` (its prefill
and decode `PhaseEstimate`s, memory summary and hardware) or given directly. The measured shapes (prompt
length, decode batch, context) differ from the plan's SLA shapes, so the floors are rescaled to them:
prefill FLOPs are linear in prompt tokens, a decode step reads the weights once plus every sequence's KV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

LOW_EFFICIENCY = 0.05
"""Below this fraction of the floor's speed the hardware is not what binds: software overhead is."""


@dataclass(frozen=True)
class PlanRef:
    gpus: int
    peak_flops: float
    """Per GPU, in the plan's compute dtype."""
    hbm_bytes_per_s: float
    prefill_flops_per_token: float
    """Per GPU (the busiest stage), from the plan's prefill estimate."""
    weight_bytes: float
    """Per GPU (the largest)."""
    kv_bytes_per_token: float
    kv_tokens: int
    """KV tokens the deployment holds."""
    max_batch_size: int
    decode_comm_s: float = 0.0
    """The plan's communication time per decode step."""
    prefill_comm_s_per_token: float = 0.0
    plan_ttft_ms: float = 0.0
    plan_tpot_ms: float = 0.0
    kv_cache_dtype: str = "none"
    weights_quant: str = "none"
    tp_size: int = 1
    pp_size: int = 1
    kv_cache_reuse: bool = False
    """serve.enable_kv_cache_reuse of the recipe."""
    cached_prefix_tokens: int = 0
    """Prompt tokens per request the plan expects from the prefix cache (sla.shared_prefix_tokens, whole blocks)."""

    @classmethod
    def from_plan(cls, plan: Any) -> PlanRef:
        pre, dec, mem, rec = plan.prefill, plan.decode, plan.memory, plan.recipe
        compute_dtype = "fp8" if rec.quantization.weights == "fp8" else rec.model.dtype  # as the planner does
        peak = plan.hardware.peak_flops(compute_dtype)
        return cls(
            gpus=plan.mapping.world_size, peak_flops=peak, hbm_bytes_per_s=plan.hardware.hbm_gbps * 1e9,
            prefill_flops_per_token=pre.flops_per_gpu / max(pre.tokens, 1),  # computed tokens (not cached)
            weight_bytes=mem.weight_bytes_max, kv_bytes_per_token=mem.kv_bytes_per_token_max,
            kv_tokens=mem.kv_tokens, max_batch_size=rec.build.max_batch_size,
            decode_comm_s=dec.comm_ms / 1e3, prefill_comm_s_per_token=pre.comm_ms / 1e3 / max(pre.tokens, 1),
            plan_ttft_ms=pre.estimate_ms, plan_tpot_ms=dec.estimate_ms,
            kv_cache_dtype=rec.quantization.kv_cache, weights_quant=rec.quantization.weights,
            tp_size=plan.mapping.tp_size, pp_size=plan.mapping.pp_size,
            kv_cache_reuse=rec.serve.enable_kv_cache_reuse, cached_prefix_tokens=pre.cached_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PhaseCheck:
    phase: str
    measured_s: float
    floor_s: float
    """max(compute, HBM) floor of the measured shape on the planned hardware, plus planned communication."""
    compute_s: float
    hbm_s: float
    comm_s: float
    achieved: float
    """prefill: FLOP/s per GPU; decode: HBM bytes/s per GPU."""
    peak: float
    bound_by: str
    """compute | HBM bandwidth | interconnect: the largest part of the floor."""

    @property
    def efficiency(self) -> float:
        """floor / measured: 1 means running at the roofline."""
        return self.floor_s / self.measured_s if self.measured_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "efficiency": self.efficiency}


def _bound(compute_s: float, hbm_s: float, comm_s: float) -> str:
    parts = {"compute": compute_s, "HBM bandwidth": hbm_s, "interconnect": comm_s}
    return max(parts, key=parts.__getitem__)


def check_prefill(ref: PlanRef, prompt_tokens: float, prefill_s: float) -> PhaseCheck:
    """One request's prefill of `prompt_tokens` that took `prefill_s` (first scheduled -> first token).

    The prompt walks the pp stages in turn, so the floor is pp_size times one stage's; `achieved` is what
    each GPU did over the prefill's wall time (at most peak / pp_size for a single request)."""
    flops = ref.prefill_flops_per_token * prompt_tokens
    compute_s = ref.pp_size * flops / ref.peak_flops
    hbm_s = ref.pp_size * ref.weight_bytes / ref.hbm_bytes_per_s
    comm_s = ref.prefill_comm_s_per_token * prompt_tokens
    return PhaseCheck("prefill", prefill_s, max(compute_s, hbm_s) + comm_s, compute_s, hbm_s, comm_s,
                      flops / prefill_s if prefill_s > 0 else 0.0, ref.peak_flops, _bound(compute_s, hbm_s, comm_s))


def check_decode(ref: PlanRef, batch: float, context_tokens: float, step_s: float) -> PhaseCheck:
    """A decode step for `batch` sequences of `context_tokens` that took `step_s` (server TPOT).

    With pp stages and pp micro-batches in flight, a sequence's token passes every stage: each stage reads
    its weights once per micro-batch and the KV of that micro-batch's sequences."""
    nbytes = ref.pp_size * ref.weight_bytes + ref.kv_bytes_per_token * batch * context_tokens
    hbm_s = nbytes / ref.hbm_bytes_per_s
    compute_s = ref.prefill_flops_per_token * batch / ref.peak_flops
    return PhaseCheck("decode", step_s, max(compute_s, hbm_s) + ref.decode_comm_s, compute_s, hbm_s,
                      ref.decode_comm_s, nbytes / step_s if step_s > 0 else 0.0, ref.hbm_bytes_per_s,
                      _bound(compute_s, hbm_s, ref.decode_comm_s))
