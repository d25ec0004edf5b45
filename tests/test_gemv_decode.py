"""The fused batch-1 GEMV kernels (runtime/kernels/triton_gemv.py) and the decode step built from them.

The kernels run on CUDA, or on CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton
installed); the CPU venv has neither, so those tests skip there and run in the GPU test run. The wiring
(when the step is used, what it falls back to and why) is tested everywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch

from enginesmith.runtime.fast.decode_gemv_step import GemvDecode, check_on_model
from enginesmith.runtime.fast.fast_decode import FastDecoder
from enginesmith.runtime.kernels.gemv_ref import gemv_ref
from enginesmith.runtime.model.paged_attention import SeqSpan
from enginesmith.runtime.model.plain_step import plain_forward
from enginesmith.runtime.model.random_model import TINY_MIXTRAL
from tests.test_decode_kernels import INTERPRET, KERNEL_DEVICE, needs_triton
from tests.test_fast_decode import assert_close, prefilled, tiny

CASES = [  # (n, k, norm, swiglu, bias, residual, out_f32)
    (48, 96, True, False, False, False, False),
    (40, 64, True, True, False, False, False),
    (64, 128, False, False, False, True, False),
    (37, 100, True, False, True, False, True),
    (32, 64, False, False, True, True, False),
]


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg", [(8, 32, 4), (16, 64, 4), (4, 128, 2), (8, 32, 4, 1, True), (4, 64, 2, 1, True)])
def test_gemv_variants_match_the_unfused_arithmetic(case, cfg):
    from enginesmith.runtime.kernels.triton_gemv import GemvConfig, gemv

    n, k, norm, swiglu, bias, residual, out_f32 = case
    gen = torch.Generator().manual_seed(n * k)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(KERNEL_DEVICE)

    kw = dict(norm=1 + 0.1 * rnd(k) if norm else None, swiglu=swiglu, bias=rnd(n) if bias else None,
              residual=rnd(1, n) if residual else None, out_f32=out_f32, eps=1e-5)
    x, w = rnd(1, k), rnd(2 * n if swiglu else n, k, scale=0.1)
    out = torch.full((1, n), float("nan"), device=KERNEL_DEVICE)  # every element must be written
    y = gemv(x, w, config=GemvConfig(*cfg), out=out, **kw)
    ref = gemv_ref(x, w, **kw)
    assert y.shape == ref.shape == (1, n) and y.dtype == ref.dtype
    assert float((y - ref).norm() / ref.norm()) < 1e-5


@needs_triton
@pytest.mark.parametrize("block_n", [2, 8, 16, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_rope_kernel_writes_rotated_q_and_the_cache_like_the_unfused_ops(block_n, bias):
    from enginesmith.runtime.fast.decode_rope_write import rope_cache_write_ref
    from enginesmith.runtime.model.layers import rope_cos_sin
    from enginesmith.runtime.kernels.triton_gemv import GemvConfig, qkv_rope_gemv

    nq, nkv, d, hid = 4, 2, 16, 48
    gen = torch.Generator().manual_seed(block_n)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(KERNEL_DEVICE)

    x, w, g = rnd(1, hid), rnd((nq + 2 * nkv) * d, hid, scale=0.2), 1 + 0.1 * rnd(hid)
    b = rnd((nq + 2 * nkv) * d) if bias else None
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = rope_cos_sin(torch.tensor([11]).to(KERNEL_DEVICE), inv, torch.float32)
    caches = [rnd(3, 4, nkv, d) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    slots = torch.tensor([6]).to(KERNEL_DEVICE)
    qkv = gemv_ref(x, w, norm=g, eps=1e-5, bias=b)
    ref_q = rope_cache_write_ref(qkv, cos, sin, *ref_caches, slots, torch.tensor([0]).to(KERNEL_DEVICE), nq, nkv, d)
    q = qkv_rope_gemv(x, w, g, 1e-5, b, cos, sin, slots, *caches, nq, nkv, d, config=GemvConfig(block_n, 32, 4))
    assert float((q - ref_q).norm() / ref_q.norm()) < 1e-5
    for c, r in zip(caches, ref_caches, strict=True):
        assert float((c - r).norm() / r.norm()) < 1e-6  # slot 6 rewritten alike, every other slot untouched


@needs_triton
def test_gemv_refuses_a_batch_and_a_mismatched_weight():
    from enginesmith.runtime.kernels.triton_gemv import gemv

    with pytest.raises(ValueError, match="one row"):
        gemv(torch.zeros(2, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="does not match"):
        gemv(torch.zeros(1, 8), torch.zeros(4, 6))


@needs_triton
@pytest.mark.parametrize("rows", [True, False, None])
def test_fused_gemv_step_matches_plain_path_and_takes_larger_batches_when_told(rows, monkeypatch):
    monkeypatch.delenv("ENGINESMITH_GEMM_ROWS", raising=False)  # None: opt-in, so off
    model = tiny(device=KERNEL_DEVICE)
    cache, seqs = prefilled(model, [7, 3])
    fast_cache = copy.deepcopy(cache)
    ref = plain_forward(model, cache, [SeqSpan(seqs[0], 7, 1)], [5])
    dec = FastDecoder(model, fast_cache, max_batch_size=2, max_seq_len=64, compile=False, gemv=True,
                      rope_kernel=INTERPRET or None, cuda_graphs=False, rows=rows)  # graphs replay without Python
    assert dec.step.gemv is not None, dec.step.gemv_note
    assert dec.status()["gemv"].startswith("fused GEMV kernels")
    assert ("through the rows kernels" in dec.status()["gemv"]) == bool(rows)
    calls = []
    dec.step.gemv = _Counting(dec.step.gemv, calls)
    out = dec.decode([seqs[0]], [5], [7])
    assert calls == [1]
    assert_close(out, ref, 1e-4)
    assert_close(fast_cache.k, cache.k, 1e-5)
    both = plain_forward(model, cache, [SeqSpan(s, p, 1) for s, p in zip(seqs, [8, 3], strict=True)], [6, 2])
    assert_close(dec.decode(seqs, [6, 2], [8, 3]), both, 1e-4)
    assert_close(fast_cache.k, cache.k, 1e-5)
    assert_close(fast_cache.v, cache.v, 1e-5)
    assert calls == ([1, 2] if rows else [1])  # two rows: the rows kernels, or (default) the regions path


class _Counting:
    """The step, recording how many rows each call through it had."""

    def __init__(self, step, calls: list):
        self.step, self.calls = step, calls

    def handles(self, rows: int) -> bool:
        return self.step.handles(rows)

    def __call__(self, input_ids, *a):
        self.calls.append(input_ids.shape[0])
        return self.step(input_ids, *a)


@needs_triton
def test_moe_model_decodes_through_the_moe_kernels_like_the_plain_path():
    model = tiny(TINY_MIXTRAL, device=KERNEL_DEVICE)
    cache, seqs = prefilled(model, [6])
    fast_cache = copy.deepcopy(cache)
    ref = plain_forward(model, cache, [SeqSpan(seqs[0], 6, 1)], [9])
    dec = FastDecoder(model, fast_cache, max_batch_size=1, max_seq_len=64, compile=False, gemv=True,
                      rope_kernel=INTERPRET or None)
    assert dec.step.gemv is not None and dec.step.gemv._moe is not None, dec.step.gemv_note
    assert_close(dec.decode(seqs, [9], [6]), ref, 1e-4)
    assert_close(fast_cache.k, cache.k, 1e-5)


def test_without_triton_the_step_stays_on_the_regions_path_with_the_reason(monkeypatch):
    import sys

    # The import fails as if triton were missing.
    monkeypatch.setitem(sys.modules, "enginesmith.runtime.kernels.triton_gemv", None)
    step, why = GemvDecode.try_build(tiny(TINY_MIXTRAL), None, None, lambda x: x, lambda x: x)
    assert step is None and "triton is not importable" in why


def test_failed_self_check_leaves_the_regions_path_with_a_recorded_reason(monkeypatch):
    import sys
    import types

    def wrong(x, w, **kw):  # a "kernel" that forgets the norm
        return gemv_ref(x, w, **{k: v for k, v in kw.items() if k not in ("norm", "eps")})

    fake = types.ModuleType("enginesmith.runtime.kernels.triton_gemv")
    fake.gemv = wrong
    monkeypatch.setitem(sys.modules, "enginesmith.runtime.kernels.triton_gemv", fake)
    model = tiny()
    cache, seqs = prefilled(model, [4])
    ref = plain_forward(model, copy.deepcopy(cache), [SeqSpan(seqs[0], 4, 1)], [3])
    dec = FastDecoder(model, cache, max_batch_size=1, max_seq_len=64, compile=False, gemv=True)
    assert dec.step.gemv is None and "self-check relative error" in dec.step.gemv_note
    assert_close(dec.decode(seqs, [3], [4]), ref)


def test_rows_kernels_failing_their_check_leave_larger_batches_on_the_regions_path(monkeypatch):
    import sys
    import types

    # The batch-1 kernels: the reference arithmetic itself.
    exact = types.ModuleType("enginesmith.runtime.kernels.triton_gemv")
    exact.gemv = lambda x, w, recv=None, **kw: gemv_ref(x, w, **kw)
    exact.rope_unsupported = lambda *a: "not under test"
    rows = types.ModuleType("enginesmith.runtime.kernels.triton_rows")
    rows.MAX_ROWS = 64
    rows.gemm_rows = lambda x, w, **kw: gemv_ref(x, w, **{k: v for k, v in kw.items() if k != "residual"})
    monkeypatch.setitem(sys.modules, "enginesmith.runtime.kernels.triton_gemv", exact)
    monkeypatch.setitem(sys.modules, "enginesmith.runtime.kernels.triton_rows", rows)
    model = tiny()
    cache, seqs = prefilled(model, [4, 6])
    ref = plain_forward(model, copy.deepcopy(cache), [SeqSpan(s, p, 1) for s, p in zip(seqs, [4, 6], strict=True)],
                        [3, 5])
    dec = FastDecoder(model, cache, max_batch_size=2, max_seq_len=64, compile=False, gemv=True, rows=True)
    assert dec.step.gemv is not None and "rows kernels' self-check error" in dec.step.gemv_note
    assert dec.step.gemv.handles(1) and not dec.step.gemv.handles(2)
    assert_close(dec.decode(seqs, [3, 5], [4, 6]), ref)


def test_self_check_measures_the_reference_against_itself_as_exact():
    assert check_on_model(tiny(), gemv_ref, gemv_ref) == 0.0


@needs_triton
@pytest.mark.parametrize("first_expert, e_local", [(0, 4), (2, 2), (1, 2)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_kernels_match_the_grouped_moe_block(first_expert, e_local, renormalize):
    from enginesmith.runtime.fast.decode_layers import moe_mlp
    from enginesmith.runtime.model.layers import rms_norm
    from enginesmith.runtime.kernels.triton_moe_gemv import moe_down, moe_router, moe_up

    gen = torch.Generator().manual_seed(first_expert * 7 + e_local)
    hid, inter, experts, top_k = 64, 48, 4, 2

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(KERNEL_DEVICE)

    h, g, res = rnd(1, hid), 1 + 0.1 * rnd(hid), rnd(1, hid)
    router = rnd(experts, hid)
    fc, proj = rnd(e_local, 2 * inter, hid, scale=0.1), rnd(e_local, hid, inter, scale=0.1)
    ref = res + moe_mlp(rms_norm(h, g, 1e-5), router, fc, proj, top_k, renormalize, first_expert, grouped=False)
    ids, prob = moe_router(h, g, 1e-5, router, top_k, renormalize)
    probs = torch.softmax(rms_norm(h, g, 1e-5) @ router.T, -1)[0]
    top = probs.topk(top_k)
    assert ids.tolist() == top.indices.tolist()
    want = top.values / top.values.sum() if renormalize else top.values
    assert torch.allclose(prob, want, atol=1e-6)
    out = moe_down(moe_up(h, fc, g, 1e-5, ids, first_expert), proj, ids, prob, first_expert, residual=res)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_configs_file_overrides_the_tuned_table_and_moe_and_rope_entries_come_first(tmp_path, monkeypatch):
    import json

    tg = pytest.importorskip("enginesmith.runtime.kernels.triton_gemv")  # dev extra; nothing here launches a kernel
    path = tmp_path / "gemv.json"
    path.write_text(json.dumps({"best": {"6144x4096": dict(block_n=32, block_k=128, num_warps=2, num_stages=1,
                                                           prefetch=False)}}))
    monkeypatch.setenv("ENGINESMITH_GEMV_CONFIGS", str(path))
    tg.configs_from_env.cache_clear()
    try:
        assert tg.config_for(6144, 4096, False) == tg.GemvConfig(32, 128, 2, 1, prefetch=False)
        assert tg.config_for(14336, 4096, True) == tg.TUNED["swiglu-14336x4096"]
        assert tg.config_for(14336, 4096, True, moe=True) == tg.TUNED["moe-swiglu-14336x4096"]
        assert tg.config_for(4096, 14336, False, moe=True) == tg.TUNED["4096x14336"]  # no moe- entry: the dense one
        assert tg.config_for(123, 456, False) == tg.DEFAULT
        assert tg.config_for(3072, 4096, False, rope=True) == tg.TUNED["rope-3072x4096"]  # qkv + rotary, tp2
        assert tg.config_for(3072, 4096, False) == tg.TUNED["3072x4096"]
        assert tg.config_for(6144, 4096, False, rope=True) == tg.GemvConfig(32, 128, 2, 1)  # no rope- entry
    finally:
        monkeypatch.delenv("ENGINESMITH_GEMV_CONFIGS")
        tg.configs_from_env.cache_clear()


def test_pdl_is_on_only_for_hopper_cuda_outside_the_interpreter(monkeypatch):
    from enginesmith.runtime.kernels import pdl

    monkeypatch.delenv("ENGINESMITH_PDL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not pdl.enabled("cpu")
    if torch.cuda.is_available():
        assert pdl.enabled("cuda") == (torch.cuda.get_device_capability() >= (9, 0))
        monkeypatch.setenv("ENGINESMITH_PDL", "0")
        assert not pdl.enabled("cuda")
        monkeypatch.delenv("ENGINESMITH_PDL")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not pdl.enabled("cuda")


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)),
                    reason="programmatic dependent launch needs a CUDA device of compute capability 9.0+")
def test_step_launched_with_pdl_matches_the_step_without_it():
    """PDL only lets a kernel start early: with graphs, the logits and the KV writes must not change."""
    model = tiny(device="cuda")
    cache, seqs = prefilled(model, [9])
    outs = []
    for pdl in (False, True):
        c = copy.deepcopy(cache)
        dec = FastDecoder(model, c, max_batch_size=1, max_seq_len=64, compile=False, gemv=True, pdl=pdl)
        assert dec.status()["pdl"] is pdl and dec.step.gemv is not None, dec.status()
        outs.append((torch.cat([dec.decode(seqs, [t], [9 + i]) for i, t in enumerate([4, 8, 15])]), c.k.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
