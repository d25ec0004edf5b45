"""Memory, KV and roofline figures of the reference deployments, against hand calculations written out here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from enginesmith.builders.planner.plan import make_plan
from enginesmith.builders.recipe import load_recipe

GIB = 1 << 30
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def kv_tokens(gpu_bytes: int, weights: int, workspace: int, per_token: int, fraction: float, block: int) -> int:
    """TensorRT-LLM order: the KV cache gets `fraction` of what weights and activations leave."""
    budget = int((gpu_bytes - weights - workspace) * fraction)
    return budget // per_token // block * block


def explicit(recipe, **parallel):
    from enginesmith.builders.recipe import ParallelSection

    return recipe.model_copy(update={"parallel": ParallelSection(**parallel)})


@pytest.fixture(scope="module")
def llama13():
    return make_plan(load_recipe(RECIPES / "llama2-13b-tp2-24gb.yaml"), with_options=False)


def test_llama2_13b_tp2_on_24gb_gpus(llama13):
    h, i, v, layers, d = 5120, 13824, 32000, 40, 128
    fp16 = 2
    per_layer = (20 + 2 * 20) * d * h + h * 20 * d + 3 * (i // 2) * h + 2 * h  # qkv, dense, mlp halves, norms
    weights = fp16 * (layers * per_layer + v * h + (v // 2) * h + h)  # embedding whole, lm_head half, ln_f
    assert weights == 13_180_119_040
    workspace = 4096 * fp16 * (4 * h + 60 * d + 20 * d + 2 * (i // 2)) + 16 * 32000 * 4 + GIB
    per_token = layers * 2 * 20 * d * fp16
    gpu = int(22.5 * GIB)
    p = llama13
    assert (p.mapping.tp_size, p.mapping.pp_size) == (2, 1)
    for r in p.ranks:
        assert r.memory.weight_bytes == weights
        assert r.memory.workspace_bytes == workspace
        assert r.memory.kv_bytes_per_token == per_token == 409_600
        assert r.memory.kv_tokens == kv_tokens(gpu, weights, workspace, per_token, 0.9, 32)
        assert r.layers == list(range(40)) and r.node == 0
    assert p.memory.kv_sequences == p.memory.kv_tokens // 4096
    # one 24 GB GPU cannot hold the fp16 weights at all
    assert p.spec.weight_bytes("float16") > gpu
    single = make_plan(explicit(p.recipe, tp_size=1), with_options=False)
    assert not single.memory.fits and not single.sla.meets and single.sla.binding == "memory capacity"


def test_llama2_13b_roofline_floors_by_hand(llama13):
    h, i, v, layers, d = 5120, 13824, 32000, 40, 128
    p, sla = llama13, llama13.recipe.sla
    dense_params = layers * ((20 + 40) * d * h + h * 20 * d + 3 * (i // 2) * h)
    lm_head = (v // 2) * h
    # prefill: 2 FLOPs per weight per token, the causal attention core, the lm_head for the last token
    flops = 2 * sla.isl * dense_params + 2 * lm_head + 4 * 20 * d * (sla.isl * (sla.isl + 1) / 2) * layers
    assert p.prefill.compute_ms == pytest.approx(flops / 125e12 * 1e3)
    # decode: every weight but the embedding table once, the looked-up rows, the batch's KV and new KV
    weights = p.ranks[0].memory.weight_bytes - v * h * 2
    batch, context = sla.concurrency, sla.isl + sla.osl / 2
    nbytes = weights + batch * h * 2 + (batch * context + batch) * 409_600
    assert p.decode.hbm_ms == pytest.approx(nbytes / 600e9 * 1e3)
    assert p.decode.floor_ms == pytest.approx(max(p.decode.hbm_ms, p.decode.compute_ms))
    assert p.decode.bound_by == "memory bandwidth" and p.prefill.bound_by == "compute"
    assert p.sla.meets and p.sla.binding == "memory bandwidth"
    ar = next(c for c in p.decode.comm if c.kind == "tp_allreduce")
    assert (ar.link, ar.count, ar.bytes_per_op) == ("pcie", 2 * layers, batch * h * 2)


def test_llama3_70b_tp2_pp2_over_two_nodes():
    p = make_plan(load_recipe(RECIPES / "llama3-70b-tp2-pp2.yaml"), with_options=False)
    h, i, v, d = 8192, 28672, 128256, 128
    per_layer = 2 * ((32 + 2 * 4) * d * h + h * 32 * d + 3 * (i // 2) * h + 2 * h)  # bf16, tp2
    stage0 = 40 * per_layer + 2 * v * h
    stage1 = 40 * per_layer + 2 * (v // 2) * h + 2 * h
    assert (stage0, stage1) == (36_328_177_664, 35_277_520_896)
    by_rank = {r.rank: r for r in p.ranks}
    assert [by_rank[r].node for r in range(4)] == [0, 0, 1, 1]  # TP inside a node, PP across nodes
    assert by_rank[0].layers == list(range(40)) and by_rank[3].layers == list(range(40, 80))
    assert by_rank[1].memory.weight_bytes == stage0 and by_rank[2].memory.weight_bytes == stage1
    assert by_rank[0].memory.kv_bytes_per_token == 40 * 2 * 4 * d * 2 == 81_920
    workspace = 8192 * 2 * (4 * h + 40 * d + 32 * d + 2 * (i // 2)) + 64 * v * 4 + GIB
    assert by_rank[0].memory.workspace_bytes == workspace
    gpu = int(79.6 * GIB)
    assert p.memory.kv_tokens == min(kv_tokens(gpu, w, workspace, 81_920, 0.9, 32) for w in (stage0, stage1))
    # TensorRT-LLM keeps pp_size = 2 micro-batches in flight; each adds 40 layers x LAYER_FIXED_US to a stage of
    # ~2 s of work: just over the idle fraction 1/3
    assert p.pipeline.micro_batches == 2 and 1 / 3 < p.pipeline.bubble_fraction < 1 / 3 + 0.01
    kinds = {c.kind: c.link for c in p.decode.comm}
    assert kinds == {"tp_allreduce": "nvlink", "lm_head_allgather": "nvlink", "pp_p2p": "infiniband"}
    assert p.sla.meets


def mixtral_rank_bytes(tp: int, ep: int, mtp: int) -> int:
    """Mixtral-8x22B bf16 weights on one rank of a pp=1 layout."""
    h, i, v, e, d, layers = 6144, 16384, 32768, 8, 128, 56
    kv_local = math.ceil(8 / tp)
    attn = (48 // tp + 2 * kv_local) * d * h + h * (48 // tp) * d
    experts = (e // ep) * 3 * h * (i // mtp)
    per_layer = 2 * (attn + experts + 2 * h) + 4 * e * h  # bf16 everything, float32 router
    return layers * per_layer + 2 * (v * h + (v // tp) * h + h)


@pytest.fixture(scope="module")
def mixtral():
    return make_plan(load_recipe(RECIPES / "mixtral-8x22b-16xa100.yaml"))


def test_mixtral_8x22b_memory_by_hand(mixtral):
    m = mixtral.mapping
    assert mixtral.memory.weight_bytes_max == mixtral_rank_bytes(m.tp_size, m.moe_ep_size, m.moe_tp_size)
    for tp, ep, mtp in [(8, 8, 1), (8, 2, 4), (16, 8, 2)]:
        forced = make_plan(explicit(mixtral.recipe, tp_size=tp, moe_ep_size=ep), with_options=False)
        assert forced.mapping.moe_tp_size == mtp
        assert forced.memory.weight_bytes_max == mixtral_rank_bytes(tp, ep, mtp)
        kv_local = max(1, 8 // tp)  # tp 16 > 8 KV heads: each rank holds one (duplicated) head
        assert forced.memory.kv_bytes_per_token_max == 56 * 2 * kv_local * 128 * 2
        experts = [r.experts for r in forced.ranks if r.moe_tp_rank == 0]
        assert sorted(x for blk in experts for x in blk) == list(range(8))


def test_mixtral_auto_picks_the_cheapest_layout_that_meets_the_sla(mixtral):
    from enginesmith.builders.planner.hardware import resolve_hardware
    from enginesmith.builders.planner.layout_rules import valid_mappings
    from enginesmith.builders.planner.plan_eval import evaluate

    hw = resolve_hardware(mixtral.recipe.hardware)
    plans = [evaluate(mixtral.recipe, mixtral.spec, hw, m) for m in valid_mappings(mixtral.spec, 16, 8)]
    assert len(plans) == mixtral.search.considered == 56
    assert mixtral.sla.meets
    assert all(not p.sla.meets for p in plans if p.world_size < mixtral.world_size)
    same = [p for p in plans if p.world_size == mixtral.world_size and p.sla.meets]
    assert min(p.decode.estimate_ms for p in same) == pytest.approx(mixtral.decode.estimate_ms)
    assert mixtral.search.runners_up and all(c.reason for c in mixtral.search.runners_up)
    fp8 = next(q for q in mixtral.quantization_options if q.weights == "fp8")
    assert not fp8.runnable and "no FP8 tensor cores" in fp8.reason


def int4(numel: int, rows: int) -> int:
    """W4A16: half a byte per weight plus one bf16 scale per output channel."""
    return numel // 2 + 2 * rows


def test_kimi_k2_int4_tp8_pp2_by_hand():
    recipe = load_recipe(RECIPES / "kimi-k2-16xa100.yaml")
    p = make_plan(explicit(recipe, tp_size=8, pp_size=2, moe_ep_size=8), with_options=False)
    h, heads = 7168, 64 // 8
    mla = (int4(1536 * h, 1536) + int4(heads * 192 * 1536, heads * 192) + int4(576 * h, 576)
           + int4(heads * 256 * 512, heads * 256) + int4(h * heads * 128, h) + 2 * (1536 + 512 + 2 * h))
    dense = int4(2 * 2304 * h, 2 * 2304) + int4(h * 2304, h)
    moe = (4 * (384 * h + 384) + int4(48 * 2 * 2048 * h, 48 * 2 * 2048) + int4(48 * h * 2048, 48 * h)
           + int4(2 * 256 * h, 2 * 256) + int4(h * 256, h))
    stage0 = 2 * 163840 * h + 31 * mla + dense + 30 * moe  # layers 0-30, layer 0 dense
    stage1 = 30 * (mla + moe) + 2 * h + 2 * 20480 * h  # layers 31-60, ln_f, lm_head rows 163840/8
    by_stage = {r.pp_rank: r.memory for r in p.ranks}
    assert (by_stage[0].weight_bytes, by_stage[1].weight_bytes) == (stage0, stage1)
    assert by_stage[0].kv_bytes_per_token == 31 * 576 * 2  # MLA latent, replicated on every TP rank
    assert any("replicated on all 8 TP ranks" in n for n in p.notes)
    assert p.memory.fits and p.sla.meets


def test_kimi_k2_says_what_fits_on_16_a100():
    p = make_plan(load_recipe(RECIPES / "kimi-k2-16xa100.yaml"))
    options = {q.weights: q for q in p.quantization_options}
    assert not options["none"].fits  # ~2 TB of bf16 cannot fit 16 x 80 GB
    assert p.spec.weight_bytes("bfloat16") > 16 * 80 * GIB
    assert not options["fp8"].runnable and "SM80" in options["fp8"].reason
    assert options["int8_weight_only"].fits and options["int4_weight_only"].meets
    assert options["int4_weight_only"].gpus <= options["int8_weight_only"].gpus <= 16
    assert p.sla.meets and p.world_size == options["int4_weight_only"].gpus
    assert p.search.chosen_reason.startswith("fewest GPUs that meet the SLA")


def test_kv_reuse_of_a_shared_prefix_by_hand(llama13):
    """isl 1024 with a 1000-token system prompt and reuse on: 992 tokens (31 blocks of 32) come from the cache."""
    h, i, v, layers, d = 5120, 13824, 32000, 40, 128
    per_token = layers * 2 * 20 * d * 2
    base = llama13.recipe
    data = base.model_dump()
    data["serve"]["enable_kv_cache_reuse"] = True
    data["sla"]["shared_prefix_tokens"] = 1000
    from enginesmith.builders.recipe import parse_recipe

    p = make_plan(parse_recipe(data), with_options=False)
    isl, osl, conc, cached = 1024, 256, 8, 992
    dense_params = layers * ((20 + 40) * d * h + h * 20 * d + 3 * (i // 2) * h)
    attended = (isl * (isl + 1) - cached * (cached + 1)) / 2
    flops = 2 * (isl - cached) * dense_params + 2 * (v // 2) * h + 4 * 20 * d * attended * layers
    assert (p.prefill.tokens, p.prefill.cached_tokens) == (isl - cached, cached)
    assert p.prefill.compute_ms == pytest.approx(flops / 125e12 * 1e3)
    # the prefill reads the weights once and the cached prefix's K/V, and writes the new tokens' K/V
    weights = p.ranks[0].memory.weight_bytes - v * h * 2
    assert p.prefill.hbm_ms == pytest.approx((weights + 32 * h * 2 + isl * per_token) / 600e9 * 1e3)
    assert p.prefill.estimate_ms < llama13.prefill.estimate_ms / 5
    kv = next(c for c in p.sla.checks if c.name == "kv_capacity")
    assert f"shared {cached}) + shared {cached} = {conc * (isl + osl - cached) + cached:,} needed" in kv.detail
    assert p.memory.sla_sequences == (p.memory.kv_tokens - cached) // (isl + osl - cached)
    assert any("992 of the 1024 prompt tokens" in n for n in p.notes)
    assert p.decode == llama13.decode  # every sequence still attends over its whole context
    # without reuse the prefix changes nothing but a note
    data["serve"]["enable_kv_cache_reuse"] = False
    off = make_plan(parse_recipe(data), with_options=False)
    assert (off.prefill, off.memory) == (llama13.prefill, llama13.memory)
    assert any("enable_kv_cache_reuse is off" in n for n in off.notes)
