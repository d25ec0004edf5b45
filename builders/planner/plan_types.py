"""The resolved plan and its parts: frozen, JSON-serialisable with `Plan.to_dict()`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from enginesmith.builders.planner.hardware import HardwareSpec
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.planner.memory import RankMemory
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.recipe import Recipe
from enginesmith.builders.planner.roofline import PhaseEstimate
from enginesmith.builders.planner.sla import SlaVerdict


@dataclass(frozen=True, slots=True)
class RankPlan:
    """One GPU: its coordinates, what it holds and its memory budget."""

    rank: int
    tp_rank: int
    pp_rank: int
    moe_ep_rank: int
    moe_tp_rank: int
    node: int
    local_gpu: int
    layers: list[int]
    """Global decoder-layer indices (the rank file numbers them from 0)."""
    experts: list[int]
    """Routed experts this rank holds (empty for dense models)."""
    memory: RankMemory


@dataclass(frozen=True, slots=True)
class MemorySummary:
    """The deployment's memory, from its tightest GPU."""

    gpu_memory_bytes: int
    weight_bytes_max: int
    workspace_bytes_max: int
    kv_bytes_per_token_max: int
    kv_tokens: int
    """KV tokens the whole deployment can hold (every stage must hold its layers' share)."""
    kv_sequences: int
    """Sequences of build.max_seq_len that fit."""
    sla_sequences: int
    """Sequences of sla.isl + sla.osl that fit."""
    model_weight_bytes: int
    """All weights in this quantization, summed over GPUs (replicas included)."""
    fits: bool


@dataclass(frozen=True, slots=True)
class PipelineInfo:
    pp_size: int
    micro_batches: int
    """Micro-batches a burst of prompts is split into (recipe's pp_micro_batches, else the fastest m up to
    4 * pp_size and the batch)."""
    bubble_fraction: float
    """Share of the burst that is not the slowest stage's work: (p-1)/(m+p-1) plus each micro-batch's fixed
    layer time (roofline.bubble_fraction)."""
    decode_micro_batches: int
    """Batches kept in flight during decode (pp_size, as TensorRT-LLM schedules them)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One layout the auto search scored."""

    layout: str
    gpus: int
    tp_size: int
    pp_size: int
    moe_ep_size: int | None
    """None for a dense model (no experts to split), as moe_tp_size."""
    moe_tp_size: int | None
    meets: bool
    fits: bool
    tpot_ms: float
    ttft_ms: float
    binding: str
    reason: str


@dataclass(frozen=True, slots=True)
class SearchResult:
    """How `parallel: auto` chose."""

    considered: int
    rejected_by_shape: int
    shape_examples: list[str]
    chosen: Candidate
    chosen_reason: str
    runners_up: list[Candidate]


@dataclass(frozen=True, slots=True)
class QuantOption:
    """What one weight quantization would give on this hardware."""

    weights: str
    runnable: bool
    reason: str
    layout: str = ""
    gpus: int = 0
    weight_gib_per_gpu: float = 0.0
    fits: bool = False
    meets: bool = False
    tpot_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    """A recipe resolved into a layout, with memory, roofline, communication and the SLA verdict."""

    recipe: Recipe
    spec: ModelSpec
    hardware: HardwareSpec
    mapping: Mapping
    ranks: list[RankPlan]
    memory: MemorySummary
    concurrency: int
    """Requests in flight the SLA implies (given, or request_rate x latency by Little's law)."""
    batch: int
    """Decode batch: concurrency capped by build.max_batch_size."""
    prefill: PhaseEstimate
    decode: PhaseEstimate
    prefill_burst: PhaseEstimate
    pipeline: PipelineInfo
    sla: SlaVerdict
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What must be done before the target can serve this checkpoint (custom code, FP8 weights, ...)."""
    search: SearchResult | None = None
    quantization_options: list[QuantOption] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.mapping.world_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of everything above; a dense model's has no expert split (mapping and ranks)."""
        out = _jsonable(self)
        if not self.spec.is_moe:
            for key in ("moe_tp_size", "moe_ep_size"):
                out["mapping"].pop(key)
            for rank in out["ranks"]:
                for key in ("moe_ep_rank", "moe_tp_rank", "experts"):
                    rank.pop(key)
        return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, RankMemory):
            out["fits"] = obj.fits
        return out
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, range)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
