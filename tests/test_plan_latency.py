"""The latency terms of the step model, by hand: per-collective latency, fixed layer time, GEMV bandwidth.

Llama-3.1-8B bf16 on H200 (4.8 TB/s HBM, NVLink 450 GB/s): h=4096, 32 layers, 32 heads / 8 KV heads of 128,
intermediate 14336, vocab 128256. Constants (builders.planner.perf_constants): NVLink 6.6 us per operation + 0.6 us
per ring step, InfiniBand 15 + 2.7 us; LAYER_FIXED_US per layer per micro-batch and HBM_EFFICIENCY of datasheet
HBM (18.4 us and 0.86 when written: 15.09 GB at 4.128 TB/s = 3.654 ms + 32 x 18.4 us = 4.243 ms per token).
"""

from __future__ import annotations

import pytest

from enginesmith.builders.planner.hardware import Link
from enginesmith.builders.planner.perf_constants import HBM_EFFICIENCY, LAYER_FIXED_US, MULTI_TOKEN_LAYER_FIXED_US
from enginesmith.builders.planner.plan import make_plan
from enginesmith.builders.recipe import parse_recipe

H, LAYERS, V, KV_PER_TOKEN = 4096, 32, 128256, 32 * 2 * 8 * 128 * 2  # K and V, 8 heads of 128, bf16


def plan(tp: int = 1, pp: int = 1, batch: int = 1, nodes: int = 1):
    return make_plan(parse_recipe({
        "name": "l8b", "model": {"source": "meta-llama/Llama-3.1-8B", "dtype": "bfloat16", "spec": "llama-3.1-8b"},
        "hardware": {"gpu": "H200", "gpus_per_node": max(1, tp * pp // nodes), "nodes": nodes},
        "parallel": {"tp_size": tp, "pp_size": pp},
        "build": {"max_batch_size": 64, "max_input_len": 2048, "max_seq_len": 4096},
        "sla": {"ttft_ms": 10000, "tpot_ms": 1000, "concurrency": batch, "isl": 512, "osl": 128}}),
        with_options=False)


def test_link_latency_per_operation_and_per_step():
    nvlink = Link("nvlink", 450.0, 0.6, 6.6)
    assert nvlink.ring_allreduce_s(0, 2) == pytest.approx((6.6 + 2 * 0.6) * 1e-6)
    assert nvlink.ring_allreduce_s(0, 8) == pytest.approx((6.6 + 14 * 0.6) * 1e-6)  # 2(p-1) = 14 ring steps
    assert nvlink.ring_allreduce_s(8192, 1) == 0
    # 1 MB point to point: 7.2 us of latency + 1e6 / 450e9 s on the wire
    assert nvlink.transfer_s(1e6) == pytest.approx(7.2e-6 + 1e6 / 450e9)


def test_tp2_batch1_all_reduces_cost_latency_times_count():
    p = plan(tp=2)
    comm = {c.kind: c for c in p.decode.comm}
    ar = comm["tp_allreduce"]
    msg = 1 * H * 2  # one token's hidden state in bf16: 8 KB
    assert (ar.link, ar.count, ar.bytes_per_op) == ("nvlink", 2 * LAYERS, msg)
    per_op = (6.6 + 2 * 0.6) * 1e-6 + msg / 450e9  # 7.8 us latency + 18 ns on the wire
    assert ar.time_s == pytest.approx(64 * per_op)
    assert ar.time_s > 0.49e-3  # latency, not bandwidth, is the cost: ~0.5 ms per token
    gather = comm["lm_head_allgather"]
    send = V * 4 / 2  # float32 logits, the other rank's half
    assert gather.time_s == pytest.approx((6.6 + 0.6) * 1e-6 + send / 450e9)
    assert p.decode.comm_ms == pytest.approx(1e3 * (ar.time_s + gather.time_s))


def test_cross_node_collectives_pay_network_latency():
    near, far = plan(tp=2), plan(tp=2, nodes=2)
    ar = next(c for c in far.decode.comm if c.kind == "tp_allreduce")
    assert ar.link == "infiniband"
    assert ar.time_s == pytest.approx(64 * ((15.0 + 2 * 2.7) * 1e-6 + H * 2 / 50e9))
    assert far.decode.estimate_ms - near.decode.estimate_ms > 64 * (20.4 - 7.8) * 1e-3 * 0.99


def test_pp_send_pays_one_operation_per_hop():
    p = plan(pp=2)
    p2p = next(c for c in p.decode.comm if c.kind == "pp_p2p")
    assert (p2p.count, p2p.bytes_per_op) == (1, H * 2)
    assert p2p.time_s == pytest.approx((6.6 + 0.6) * 1e-6 + H * 2 / 450e9)


def test_batch1_decode_is_gemv_bandwidth_plus_fixed_layer_time():
    p = plan()
    i, q, kv = 14336, 32 * 128, 8 * 128
    per_layer = q * H + 2 * kv * H + H * q + 3 * i * H + 2 * H  # qkv, o, gate/up/down, two norms
    weights = 2 * (LAYERS * per_layer + 2 * V * H + H)  # embedding, lm_head, final norm
    assert p.ranks[0].memory.weight_bytes == weights
    context = 512 + 128 / 2
    read = weights - V * H * 2 + H * 2 + (context + 1) * KV_PER_TOKEN  # one embedding row, KV read + written
    hbm_s = read / (HBM_EFFICIENCY * 4800e9)
    fixed_s = LAYERS * LAYER_FIXED_US * 1e-6
    assert p.decode.fixed_ms == pytest.approx(1e3 * fixed_s)
    assert p.decode.estimate_ms == pytest.approx(1e3 * (hbm_s + fixed_s))
    assert hbm_s > 5 * fixed_s  # the weights, not the fixed kernel time, set the step
    assert p.decode.bound_by == "memory bandwidth"


def test_batched_decode_pays_the_multi_token_layer_time_on_every_rank():
    one, b2, b32, b32_tp2 = plan(), plan(batch=2), plan(batch=32), plan(tp=2, batch=32)
    multi = LAYERS * (LAYER_FIXED_US + MULTI_TOKEN_LAYER_FIXED_US) * 1e-3
    assert one.decode.fixed_ms == pytest.approx(LAYERS * LAYER_FIXED_US * 1e-3)  # one token: the GEMV step
    assert b2.decode.fixed_ms == b32.decode.fixed_ms == b32_tp2.decode.fixed_ms == pytest.approx(multi)
    # the bytes barely grow from 1 to 2 rows, so the step grows by the added fixed time (and a little KV)
    added = b2.decode.estimate_ms - one.decode.estimate_ms
    assert LAYERS * MULTI_TOKEN_LAYER_FIXED_US * 1e-3 < added < 1.05 * LAYERS * MULTI_TOKEN_LAYER_FIXED_US * 1e-3


def test_tp2_batch1_splits_bytes_but_not_fixed_time_or_latency():
    one, two = plan(), plan(tp=2)
    assert two.decode.fixed_ms == pytest.approx(one.decode.fixed_ms)  # every rank runs all 32 layers' kernels
    # half the weights per GPU, the same fixed time, plus the collectives: far from a 2x speed-up
    speedup = one.decode.estimate_ms / two.decode.estimate_ms
    assert 1.3 < speedup < 1.6
