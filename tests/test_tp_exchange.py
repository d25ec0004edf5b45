"""The TP exchange (runtime/parallel/tp_exchange.py): all-reduces and the logits gather inside the GEMV kernels.

Kernel tests run two "ranks" over two buffers of one device (CUDA, or CPU under Triton's interpreter):
producers before consumers, so no poll spins. The step test runs two real processes (gloo for the prefill's
collectives) under the interpreter with the exchange buffers in shared CPU memory, so the consumers do wait
for the other process's kernels, and compares the step with the collective path and with tp=1.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from enginesmith.runtime.kernels.gemv_ref import gemv_ref
from enginesmith.runtime.model.random_model import TINY_LLAMA, TINY_MIXTRAL, checkpoint_config, random_rank_model
from enginesmith.runtime.parallel.tp_exchange import TPExchange
from tests.test_decode_kernels import INTERPRET, KERNEL_DEVICE, needs_triton

H, K, V = 64, 96, 40  # hidden, o_proj input, vocab slice


def _buffers(tp: int, points: int, hidden: int, vocab_local: int, dtype, device=KERNEL_DEVICE) -> list[torch.Tensor]:
    _, total = TPExchange.layout(tp, points, hidden, vocab_local, dtype)
    bufs = [torch.zeros(total, dtype=torch.uint8, device=device) for _ in range(tp)]
    for b in bufs:
        TPExchange.mark_empty(b, tp, points, hidden, vocab_local, dtype)
    return bufs


def _ranks(tp: int = 2, points: int = 2, spin: int = 100_000, dtype=torch.float32) -> list[TPExchange]:
    bufs = _buffers(tp, points, H, V, dtype)
    return [TPExchange.over_buffers(bufs, r, dtype, H, V, points, spin=spin) for r in range(tp)]


def _empty(t: torch.Tensor) -> torch.Tensor:
    """Which elements hold the -0.0 "not landed" mark."""
    bits = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.view(bits) == torch.iinfo(bits).min


def _rnd(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(KERNEL_DEVICE)


POLLS = ["seq", "vec", "handoff"]  # runtime/triton_gemv.x_poll: how the consumer programs poll the slots


@needs_triton
@pytest.mark.parametrize("poll", POLLS)
@pytest.mark.parametrize("tp", [2, 3])
def test_exchange_sums_partials_and_gathers_logits_like_the_collectives(tp, poll, monkeypatch):
    from enginesmith.runtime.kernels.triton_gemv import POLL_ENV, gemv

    monkeypatch.setenv(POLL_ENV, poll)
    gen = torch.Generator().manual_seed(tp)
    exs = _ranks(tp)
    res, norm = _rnd(gen, 1, H), 1 + 0.1 * _rnd(gen, H)
    w1 = [_rnd(gen, H, K, scale=0.1) for _ in range(tp)]  # row-parallel partials
    w2 = [_rnd(gen, V, H, scale=0.1) for _ in range(tp)]  # vocab-parallel lm_head slices
    for step in range(4):  # the slots' three sets rotate with the epoch: no reset between steps
        x = [_rnd(gen, 1, K) for _ in range(tp)]
        parts = [gemv_ref(x[r], w1[r], residual=res if r == 0 else None) for r in range(tp)]
        ref_h = sum(parts[1:], parts[0])
        ref_logits = torch.cat([gemv_ref(ref_h, w2[r], norm=norm, out_f32=True) for r in range(tp)], -1)
        for ex in exs:
            ex.begin_step()
        for r, ex in enumerate(exs):
            assert gemv(x[r], w1[r], residual=res if r == 0 else None, send=ex.send(1)) is None
        here, after = (step + 1) % 3, (step + 2) % 3  # this step's set, the one its consumers empty
        for ex in exs:  # every rank's partial has landed in every rank's slots of this step's set
            assert torch.allclose(ex._slots[here, 1], torch.cat(parts), rtol=1e-5, atol=1e-5), (step, ex.rank)
        hs = [torch.full((1, H), float("nan"), device=KERNEL_DEVICE) for _ in range(tp)]
        for r, ex in enumerate(exs):
            gemv(hs[r], w2[r], norm=norm, out_f32=True, recv=ex.recv(1), send=ex.send_logits())
        logits = [ex.wait_logits().clone() for ex in exs]
        for r, ex in enumerate(exs):
            ex.check_error()
            assert torch.allclose(hs[r], ref_h, rtol=1e-5, atol=1e-5), (step, r)
            assert torch.allclose(logits[r], ref_logits, rtol=1e-4, atol=1e-5), (step, r)
            assert torch.equal(hs[r], hs[0]) and torch.equal(logits[r], logits[0])  # same bits on every rank
            assert _empty(ex._slots[after, 1]).all() and _empty(ex._logits[after]).all(), (step, r)
            assert not _empty(ex._slots[here, 1]).any()  # this step's set stays filled until its turn to be emptied


@needs_triton
def test_a_partial_that_rounds_to_minus_zero_still_arrives_as_plus_zero():
    """-0.0 is the "not landed" mark, so a producer stores a -0.0 result as +0.0 instead of hanging its peers."""
    from enginesmith.runtime.kernels.triton_gemv import gemv

    exs = _ranks(dtype=torch.bfloat16, spin=50)
    x = torch.full((1, K), 1e-22, device=KERNEL_DEVICE).to(torch.bfloat16)
    w = torch.full((H, K), -1e-22, device=KERNEL_DEVICE).to(torch.bfloat16)  # x . w ~ -1e-42: rounds to -0.0 in bf16
    for ex in exs:
        ex.begin_step()
    for ex in exs:
        gemv(x, w, send=ex.send(0))
    h = torch.empty(1, H, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    gemv(h, torch.ones(V, H, dtype=torch.bfloat16, device=KERNEL_DEVICE), norm=torch.ones(H, device=KERNEL_DEVICE,
         dtype=torch.bfloat16), recv=exs[0].recv(0))
    exs[0].check_error()  # no poll gave up
    assert (exs[0]._slots[1, 0].view(torch.int16) == 0).all()  # +0.0 bits in both ranks' slots
    assert not torch.signbit(h).any() and (h == 0).all()


@needs_triton
@pytest.mark.parametrize("poll", POLLS)
def test_a_wait_for_a_peer_that_never_sends_gives_up_and_reports_it(poll, monkeypatch):
    from enginesmith.runtime.kernels.triton_gemv import POLL_ENV, gemv

    monkeypatch.setenv(POLL_ENV, poll)
    gen = torch.Generator().manual_seed(0)
    exs = _ranks(spin=50)
    exs[0].begin_step()
    gemv(_rnd(gen, 1, K), _rnd(gen, H, K), send=exs[0].send(0))  # rank 1 never produces point 0
    gemv(torch.empty(1, H, device=KERNEL_DEVICE), _rnd(gen, V, H), norm=torch.ones(H, device=KERNEL_DEVICE),
         recv=exs[0].recv(0))
    with pytest.raises(RuntimeError, match="never delivered"):
        exs[0].check_error()
    exs[1].check_error()  # rank 1 waited for nothing


@needs_triton
@pytest.mark.parametrize("early", [True, False])
def test_reduce_kernel_sums_every_ranks_partial_in_rank_order_and_empties_the_next_set(early):
    """Mode "kernel": each point is a small kernel. Under one process the ranks' kernels run one after the
    other, so rank 1's partial is placed in rank 0's slot first, as its store would have landed."""
    gen = torch.Generator().manual_seed(3)
    exs = _ranks(points=3)  # float32 (the interpreter's bf16 rounding is not the GPU's)
    for step in range(4):  # the three sets rotate: no reset between steps
        parts = [_rnd(gen, 1, H) for _ in exs]
        ref = parts[0] + parts[1]
        for ex in exs:
            ex.begin_step()
        here, after = (step + 1) % 3, (step + 2) % 3
        exs[0]._slots[here, 2, 1] = parts[1][0]
        outs = [ex.all_reduce(2, parts[r], early=early) for r, ex in enumerate(exs)]
        for r, ex in enumerate(exs):
            ex.check_error()
            assert torch.equal(outs[r], ref), (step, r)
            assert torch.equal(ex._slots[here, 2], torch.cat(parts)), (step, r)
            assert _empty(ex._slots[after, 2]).all() and _empty(ex._slots[here, :2]).all(), (step, r)


@needs_triton
def test_split_mode_sums_what_the_producer_gemvs_stored():
    """Mode "split": the residual GEMVs store into the slots (send), a small kernel per point sums them."""
    from enginesmith.runtime.kernels.triton_gemv import gemv

    gen = torch.Generator().manual_seed(4)
    exs = _ranks()
    w = [_rnd(gen, H, K, scale=0.1) for _ in exs]
    res = _rnd(gen, 1, H)
    for step in range(4):
        x = [_rnd(gen, 1, K) for _ in exs]
        parts = [gemv_ref(x[r], w[r], residual=res if r == 0 else None) for r in range(2)]
        for ex in exs:
            ex.begin_step()
        for r, ex in enumerate(exs):
            gemv(x[r], w[r], residual=res if r == 0 else None, send=ex.send(1))
        outs = [ex.landed_sum(1) for ex in exs]
        for r, ex in enumerate(exs):
            ex.check_error()
            assert torch.allclose(outs[r], parts[0] + parts[1], rtol=1e-5, atol=1e-5), (step, r)
            assert torch.equal(outs[r], outs[0]) and _empty(ex._slots[(step + 2) % 3, 1]).all()


@needs_triton
def test_reduce_kernel_gives_up_on_a_peer_that_never_sends():
    exs = _ranks(spin=50)
    exs[0].begin_step()
    out = exs[0].all_reduce(0, torch.ones(1, H, device=KERNEL_DEVICE))
    with pytest.raises(RuntimeError, match="never delivered"):
        exs[0].check_error()
    assert out.shape == (1, H)


def test_poll_modes_map_to_the_kernel_switches(monkeypatch):
    from enginesmith.runtime.parallel.tp_signal import HANDOFF
    from enginesmith.runtime.kernels.triton_gemv import POLL_ENV, x_poll

    recv = _ranks(points=1)[0].recv(0)
    assert x_poll(None, 4096, 512) == dict(XCHUNKS=1, XHANDOFF=0)  # no exchange: unused
    assert x_poll(recv, 4096, 512) == dict(XCHUNKS=0, XHANDOFF=0)  # default: chunk after chunk (fastest in the step)
    monkeypatch.setenv(POLL_ENV, "vec")
    assert x_poll(recv, 4096, 512) == dict(XCHUNKS=16, XHANDOFF=0)  # 2 x 4096 elements, 512-element chunks at once
    monkeypatch.setenv(POLL_ENV, "handoff")
    assert x_poll(recv, 4096, 512) == dict(XCHUNKS=16, XHANDOFF=HANDOFF.value) and HANDOFF.value > 0


def test_layout_keeps_regions_aligned_and_apart_and_marks_them_empty():
    offs, total = TPExchange.layout(tp=2, num_points=64, hidden=4096, vocab_local=64128, dtype=torch.bfloat16)
    slots, logits = offs
    assert slots == 0 and logits >= 3 * 64 * 2 * 4096 * 2 and total >= logits + 3 * 2 * 64128 * 4
    assert all(o % 256 == 0 for o in offs)
    buf = _buffers(2, 3, 8, 5, torch.bfloat16, device="cpu")[0]
    (_, l_off), _ = TPExchange.layout(2, 3, 8, 5, torch.bfloat16)
    assert _empty(buf[: 3 * 3 * 2 * 8 * 2].view(torch.bfloat16)).all()
    assert _empty(buf[l_off: l_off + 3 * 2 * 5 * 4].view(torch.float32)).all()


def test_exchange_modes_by_switch_and_cpu_refused_with_the_reason(monkeypatch):
    ex = TPExchange.__new__(TPExchange)
    ex.device, ex.dtype = torch.device("cpu"), torch.float32
    monkeypatch.setenv("ENGINESMITH_TP_EXCHANGE", "0")
    assert "ENGINESMITH_TP_EXCHANGE=0; kernel (the default), split or 1 (fused) turns it on" in ex._local_problem()
    for value in (None, "1", "split"):
        if value is None:
            monkeypatch.delenv("ENGINESMITH_TP_EXCHANGE", raising=False)  # on by default, in mode "kernel"
        else:
            monkeypatch.setenv("ENGINESMITH_TP_EXCHANGE", value)
        assert "needs CUDA" in ex._local_problem()
        ex._set(None, 0, 2, "cpu", torch.float32, 8, 8, 2, False, 10)
        assert ex.mode == {None: "kernel", "1": "fused", "split": "split"}[value]


def test_the_fused_mode_serves_dense_models_only_and_the_kernels_serve_both():
    ex = _ranks(points=1)[0]
    for mode, dense, moe in (("fused", True, False), ("kernel", True, True), ("split", True, True)):
        ex.mode = mode
        assert (ex.serves(False), ex.serves(True)) == (dense, moe), mode


@pytest.mark.parametrize("value", ["300", "8", "8192", "big"])
def test_a_bad_reduce_block_is_refused_naming_the_variable(value, monkeypatch):
    monkeypatch.setenv("ENGINESMITH_TP_REDUCE_BLOCK", value)
    with pytest.raises(ValueError, match=f"ENGINESMITH_TP_REDUCE_BLOCK='{value}': give a power of two"):
        _ranks()
    monkeypatch.setenv("ENGINESMITH_TP_REDUCE_BLOCK", "256")
    assert _ranks()[0].block == 256


# ---- two processes, one decode step ----
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_rank(rank: int, port: int, bufs: list[torch.Tensor], queue, moe: bool) -> None:
    import copy

    import torch.distributed as dist

    from enginesmith.builders.mapping import Mapping
    from enginesmith.runtime.fast.fast_decode import FastDecoder
    from enginesmith.runtime.engine.kv_cache import PagedKVCache
    from enginesmith.runtime.model.paged_attention import SeqSpan
    from enginesmith.runtime.parallel.groups import init_parallel
    from enginesmith.runtime.model.plain_step import plain_forward

    torch.set_num_threads(1)
    groups = init_parallel(Mapping.create(tp_size=2), rank, f"tcp://127.0.0.1:{port}", "gloo")
    cfg = checkpoint_config(TINY_MIXTRAL if moe else TINY_LLAMA, tp_size=2)
    model = random_rank_model(cfg, rank, seed=1)
    reduce, gather = groups.all_reduce_tp, groups.gather_tp_last_dim
    cache = PagedKVCache(num_layers=model.num_local_layers, num_kv_heads=model.num_kv_heads,
                         head_size=model.head_size, num_blocks=16, tokens_per_block=4)
    cache.reserve(0, 12)
    plain_forward(model, cache, [SeqSpan(0, 0, len(PROMPT))], PROMPT, reduce, gather)
    ex = TPExchange.over_buffers(bufs, rank, model.dtype, cfg.hidden_size, model.lm_head.shape[0],
                                 2 * model.num_local_layers, spin=200_000)
    ex.group, ex.check_columns = groups.tp_group, 48  # the set-up check, lm_head's slice in several chunks
    ex._self_check()  # raises on a poll that gave up or a wrong number; empties every slot after
    check_err = ex.check_err
    outs = {}
    for name in (() if moe else ("exchange",)) + ("kernel", "split", "collectives"):
        ex.mode = name if name in ("kernel", "split") else "fused"  # the sets rotate on: no reset between paths
        exchange = None if name == "collectives" else ex
        dec = FastDecoder(model, copy.deepcopy(cache), max_batch_size=1, max_seq_len=12, compile=False, gemv=True,
                          rope_kernel=True, cuda_graphs=False, reduce=reduce, gather=gather, exchange=exchange)
        assert ("TP exchange" in dec.status()["gemv"]) == (exchange is not None), dec.status()["gemv"]
        assert (f"exchange kernels ({name})" in dec.status()["gemv"]) == (name in ("kernel", "split"))
        outs[name] = [dec.decode([0], [tok], [len(PROMPT) + i]).clone() for i, tok in enumerate(NEXT)]
    ex.check_error()
    queue.put((rank, {k: [t.numpy() for t in v] for k, v in outs.items()} | dict(check_err=check_err)))
    dist.destroy_process_group()


PROMPT, NEXT = [5, 17, 33, 2, 99], [7, 250]


@pytest.mark.skipif(not INTERPRET, reason="the two-process step runs its kernels under Triton's interpreter "
                                          "(GPU runs: benchmarks/runtime.py --sections tp)")
@pytest.mark.parametrize("moe", [False, True], ids=["llama", "mixtral"])
def test_two_ranks_step_through_the_exchange_like_the_collective_path_and_tp1(moe):
    """Every mode against the collective path and tp=1; the tiny Mixtral (its experts split over the ranks) takes
    the exchange kernels after its MoE blocks (the fused mode covers dense layers only)."""
    from enginesmith.runtime.engine.kv_cache import PagedKVCache
    from enginesmith.runtime.model.paged_attention import SeqSpan
    from enginesmith.runtime.model.plain_step import plain_forward

    shape = TINY_MIXTRAL if moe else TINY_LLAMA
    cfg = checkpoint_config(shape, tp_size=2)
    model1 = random_rank_model(checkpoint_config(shape), seed=1)
    n_points = 2 * model1.num_local_layers
    vocab_local = random_rank_model(cfg, 0, seed=1).lm_head.shape[0]
    bufs = [b.share_memory_() for b in _buffers(2, n_points, cfg.hidden_size, vocab_local, model1.dtype, "cpu")]
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_step_rank, args=(r, port, bufs, queue, moe)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        got = dict(queue.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    cache = PagedKVCache(num_layers=model1.num_local_layers, num_kv_heads=model1.num_kv_heads,
                         head_size=model1.head_size, num_blocks=16, tokens_per_block=4)
    cache.reserve(0, 12)
    plain_forward(model1, cache, [SeqSpan(0, 0, len(PROMPT))], PROMPT)
    assert all(got[r]["check_err"] < 1e-4 for r in range(2)), [got[r]["check_err"] for r in range(2)]
    modes = ("kernel", "split") if moe else ("exchange", "kernel", "split")
    for i, tok in enumerate(NEXT):
        ref = plain_forward(model1, cache, [SeqSpan(0, len(PROMPT) + i, 1)], [tok])[:, : cfg.vocab_size]
        for r in range(2):
            coll = torch.from_numpy(got[r]["collectives"][i])[:, : cfg.vocab_size]
            assert torch.allclose(coll, ref, rtol=1e-4, atol=1e-4), (i, r, float((coll - ref).abs().max()))
            for mode in modes:
                ex = torch.from_numpy(got[r][mode][i])[:, : cfg.vocab_size]
                assert torch.allclose(ex, coll, rtol=1e-4, atol=1e-4), (mode, i, r, float((ex - coll).abs().max()))
        for mode in modes:
            assert torch.equal(torch.from_numpy(got[0][mode][i]), torch.from_numpy(got[1][mode][i])), mode
