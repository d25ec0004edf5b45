"""Score one explicit layout: ranks, memory, roofline, communication, pipeline and the SLA verdict."""

from __future__ import annotations

from dataclasses import asdict

import math

from enginesmith.builders.planner.hardware import HardwareSpec
from enginesmith.builders.mapping import Mapping, ep_experts, pad_vocab_size, pp_layers
from enginesmith.builders.planner.memory import MemoryInputs, RankMemory, rank_memory, stage_totals
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.planner.plan_types import MemorySummary, PipelineInfo, Plan, RankPlan
from enginesmith.builders.recipe import ParallelSection, Recipe
from enginesmith.builders.planner.roofline import PerfModel, StageShape, best_micro_batches, bubble_fraction
from enginesmith.builders.planner.sla import sla_checks, verdict
from enginesmith.builders.planner.target_notes import runtime_micro_batches, target_notes


def memory_inputs(recipe: Recipe, hw: HardwareSpec) -> MemoryInputs:
    b = recipe.build
    return MemoryInputs(dtype=recipe.model.dtype, weights=recipe.quantization.weights,
                        kv_cache=recipe.quantization.kv_cache, gpu_memory_bytes=hw.memory_bytes,
                        max_batch_size=b.max_batch_size, max_beam_width=b.max_beam_width,
                        max_num_tokens=b.max_num_tokens, max_seq_len=b.max_seq_len,
                        tokens_per_block=b.tokens_per_block, kv_fraction=recipe.serve.kv_cache_free_gpu_mem_fraction)


def cached_prefix_tokens(recipe: Recipe) -> int:
    """Prompt tokens per request KV-cache reuse serves from the cache: sla.shared_prefix_tokens in whole blocks,
    at most isl - 1 (the last prompt token is always computed); 0 without serve.enable_kv_cache_reuse."""
    if not recipe.serve.enable_kv_cache_reuse:
        return 0
    tpb = recipe.build.tokens_per_block
    return min(recipe.sla.shared_prefix_tokens, recipe.sla.isl - 1) // tpb * tpb


def _ranks(spec: ModelSpec, m: Mapping, stage_mem: list[RankMemory], stage_layers: list[list[int]]) -> list[RankPlan]:
    out = []
    for c in m.ranks():
        experts = list(ep_experts(spec.num_experts, m.moe_ep_size, c.moe_ep_rank)) if spec.is_moe else []
        out.append(RankPlan(**asdict(c), layers=stage_layers[c.pp_rank], experts=experts,
                            memory=stage_mem[c.pp_rank]))
    return out


def _summary(recipe: Recipe, stage_mem: list[RankMemory], m: Mapping, hw: HardwareSpec) -> MemorySummary:
    kv_tokens = min(r.kv_tokens for r in stage_mem)
    shared = cached_prefix_tokens(recipe)
    return MemorySummary(
        gpu_memory_bytes=hw.memory_bytes,
        weight_bytes_max=max(r.weight_bytes for r in stage_mem),
        workspace_bytes_max=max(r.workspace_bytes for r in stage_mem),
        kv_bytes_per_token_max=max(r.kv_bytes_per_token for r in stage_mem),
        kv_tokens=kv_tokens, kv_sequences=kv_tokens // recipe.build.max_seq_len,
        sla_sequences=max(0, kv_tokens - shared) // (recipe.sla.isl + recipe.sla.osl - shared),
        model_weight_bytes=sum(r.weight_bytes for r in stage_mem) * m.tp_size,
        fits=all(r.fits for r in stage_mem))


def _concurrency(recipe: Recipe, perf: PerfModel) -> int:
    """Given concurrency, or request_rate x end-to-end latency (Little's law, iterated to a fixed point)."""
    s = recipe.sla
    if s.concurrency is not None:
        return s.concurrency
    ttft = perf.prefill(s.isl, cached_prefix_tokens(recipe)).estimate_ms
    c = 1
    for _ in range(30):
        batch = min(c, recipe.build.max_batch_size)
        e2e_s = (ttft + (s.osl - 1) * perf.decode(batch, s.isl + s.osl / 2).estimate_ms) / 1e3
        nxt = max(1, math.ceil(s.request_rate * e2e_s))
        if nxt == c or nxt > 64 * recipe.build.max_batch_size:
            return nxt
        c = nxt
    return c


def _notes(recipe: Recipe, spec: ModelSpec, m: Mapping, hw: HardwareSpec, concurrency: int) -> list[str]:
    notes = []
    if m.world_size < hw.total_gpus:
        notes.append(f"uses {m.world_size} of the {hw.total_gpus} GPUs")
    if m.tp_size > 1 and len({r // hw.gpus_per_node for r in m.tp_group(0)}) > 1:
        notes.append(f"the TP group spans nodes: every all-reduce crosses {hw.inter_node.kind}")
    if m.pp_size > 1 and len({s * m.tp_size // hw.gpus_per_node for s in range(m.pp_size)}) > 1:
        notes.append("pipeline stages span nodes: only stage boundaries cross the inter-node link")
    if spec.is_mla and m.tp_size > 1:
        notes.append(f"MLA caches one latent per token: it is replicated on all {m.tp_size} TP ranks")
    elif m.tp_size > spec.num_key_value_heads:
        reps = m.tp_size // spec.num_key_value_heads
        notes.append(f"tp_size {m.tp_size} > num_key_value_heads {spec.num_key_value_heads}: each KV head is "
                     f"duplicated on {reps} ranks (weights and KV cache)")
    if (pad := pad_vocab_size(spec.vocab_size, m.tp_size)) != spec.vocab_size:
        notes.append(f"lm_head padded from {spec.vocab_size} to {pad} rows ({pad // m.tp_size} per TP rank)")
    if recipe.quantization.weights in ("int8_weight_only", "int4_weight_only"):
        notes.append(f"weight-only: weights stored as int{8 if 'int8' in recipe.quantization.weights else 4}, "
                     f"GEMMs run in {recipe.model.dtype} (A16)")
    if concurrency > recipe.build.max_batch_size:
        notes.append(f"{concurrency} requests in flight exceed build.max_batch_size={recipe.build.max_batch_size}")
    shared, s = cached_prefix_tokens(recipe), recipe.sla
    if shared:
        notes.append(f"KV-cache reuse: {shared} of the {s.isl} prompt tokens (the shared prefix, whole blocks of "
                     f"{recipe.build.tokens_per_block}) come from the cache: prefill computes {s.isl - shared}, "
                     "and the KV cache holds the prefix once")
    elif s.shared_prefix_tokens and not recipe.serve.enable_kv_cache_reuse:
        notes.append(f"sla.shared_prefix_tokens={s.shared_prefix_tokens} but serve.enable_kv_cache_reuse is off: "
                     "every request computes and stores the prefix again")
    elif s.shared_prefix_tokens:
        notes.append(f"sla.shared_prefix_tokens={s.shared_prefix_tokens} is less than one KV block of "
                     f"{recipe.build.tokens_per_block} tokens: reuse shares whole blocks only")
    return notes


def default_micro_batches(recipe: Recipe, pp_size: int, batch: int, stage_s: float, per_micro_s: float) -> int:
    """What the target runs: TensorRT-LLM's pp_size; for the reference runtime the recipe's pp_micro_batches,
    else the fastest m up to 4 * pp_size (bubble <= 1/5 at p=2) and the batch.

    `stage_s` / `per_micro_s`: the slowest stage's work for the burst and each micro-batch's fixed time;
    when the work is small next to the fixed time, fewer micro-batches are faster.
    """
    if (fixed := runtime_micro_batches(recipe, pp_size)) is not None:
        return fixed
    if isinstance(recipe.parallel, ParallelSection) and recipe.parallel.pp_micro_batches:
        return recipe.parallel.pp_micro_batches
    if pp_size == 1:
        return 1
    return best_micro_batches(pp_size, stage_s, per_micro_s, max(1, min(4 * pp_size, batch)))


def evaluate(recipe: Recipe, spec: ModelSpec, hw: HardwareSpec, m: Mapping) -> Plan:
    """The full plan of `recipe` on layout `m` (no search, no quantization alternatives)."""
    x = memory_inputs(recipe, hw)
    layers = [list(pp_layers(spec.num_hidden_layers, m.pp_size, s)) for s in range(m.pp_size)]
    mem = [rank_memory(spec, m, s, layers[s], x) for s in range(m.pp_size)]
    stages = [StageShape(s, layers[s], stage_totals(spec, m, s, layers[s], lambda sh: sh.numel),
                         mem[s].weights_by_component, mem[s].kv_bytes_per_token) for s in range(m.pp_size)]
    compute_dtype = "fp8" if recipe.quantization.weights == "fp8" else recipe.model.dtype
    perf = PerfModel(spec, m, hw, stages, x.act_bytes, compute_dtype, recipe.build.target)
    s = recipe.sla
    concurrency = _concurrency(recipe, perf)
    batch = min(concurrency, recipe.build.max_batch_size)
    cached = cached_prefix_tokens(recipe)
    prefill, decode = perf.prefill(s.isl, cached), perf.decode(batch, s.isl + s.osl / 2)
    work_s, per_micro_s = perf.burst_stage(batch, s.isl, cached)
    micro = default_micro_batches(recipe, m.pp_size, batch, work_s, per_micro_s)
    burst = perf.prefill_burst(batch, s.isl, micro, cached)
    summary = _summary(recipe, mem, m, hw)
    checks = sla_checks(s, used_bytes=max(r.weight_bytes + r.workspace_bytes for r in mem),
                        gpu_bytes=hw.memory_bytes, kv_tokens=summary.kv_tokens, max_seq_len=recipe.build.max_seq_len,
                        concurrency=concurrency, max_batch_size=recipe.build.max_batch_size,
                        prefill=prefill, decode=decode, cached_prefix=cached)
    pipeline = PipelineInfo(m.pp_size, micro, bubble_fraction(m.pp_size, micro, per_micro_s, work_s),
                            decode.micro_batches)
    notes, warnings = target_notes(recipe, spec, m, hw)
    return Plan(recipe=recipe, spec=spec, hardware=hw, mapping=m, ranks=_ranks(spec, m, mem, layers),
                memory=summary, concurrency=concurrency, batch=batch, prefill=prefill, decode=decode,
                prefill_burst=burst, pipeline=pipeline, sla=verdict(checks),
                notes=_notes(recipe, spec, m, hw, concurrency) + notes, warnings=warnings)

