"""The grouped rows kernels of multi-token MoE steps (runtime/kernels/triton_moe_rows.py) and the
decode step using them.

Kernels run on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1, the Makefile's second test pass).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from enginesmith.runtime.fast.decode_layers import moe_mlp
from enginesmith.runtime.fast.fast_decode import FastDecoder
from enginesmith.runtime.model.layers import swiglu
from enginesmith.runtime.model.paged_attention import SeqSpan
from enginesmith.runtime.model.plain_step import plain_forward
from enginesmith.runtime.model.random_model import TINY_MIXTRAL
from tests.test_decode_kernels import INTERPRET, KERNEL_DEVICE, needs_triton
from tests.test_fast_decode import assert_close, prefilled, tiny


def _groups(sizes: list[int], k: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), k, generator=gen).to(KERNEL_DEVICE)
    w = (0.1 * torch.randn(len(sizes), n, k, generator=gen)).to(KERNEL_DEVICE)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32).to(KERNEL_DEVICE)
    return x, w, offs


def _per_group(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return torch.cat([F.linear(part, w[g]) for g, part in enumerate(x.split(sizes))])


@needs_triton
@pytest.mark.parametrize("sizes", [[0, 3, 70, 5], [4, 0, 0, 1], [0, 0, 0, 0], [16, 16, 16, 16]])
@pytest.mark.parametrize("block", [None, (32, 32, 4, 1)])  # default BLOCK_K 128 > K: the masked K loop
def test_grouped_rows_give_each_groups_rows_times_its_weights(sizes, block):
    """Empty groups write nothing and read nothing, a group of 70 rows takes two 64-row passes."""
    from enginesmith.runtime.kernels.triton_moe_rows import RowsConfig, grouped, grouped_swiglu

    block = RowsConfig(*block) if block else None
    k, n = 96, 40
    x, w, offs = _groups(sizes, k, 2 * n, seed=sum(sizes))
    inter = n
    ref_fc = _per_group(x, w, sizes)
    up, gate = ref_fc.split(inter, dim=-1)
    act, out = grouped_swiglu(x, w, offs, max(sizes), block), grouped(x, w, offs, max(sizes), block)
    assert act.shape == (sum(sizes), inter) and out.shape == (sum(sizes), 2 * n)
    if sum(sizes):
        assert_close(act, swiglu(gate, up), 1e-5)
        assert_close(out, ref_fc, 1e-5)


@needs_triton
def test_grouped_rows_refuse_mismatched_weights_and_group_ends():
    from enginesmith.runtime.kernels.triton_moe_rows import grouped

    x, w, offs = _groups([2, 3], 32, 16)
    with pytest.raises(ValueError, match="do not match"):
        grouped(x, w[:, :, :16].contiguous(), offs, 3)
    with pytest.raises(ValueError, match="int32 group ends"):
        grouped(x, w, offs.long(), 3)


@needs_triton
def test_moe_block_through_the_rows_kernels_matches_the_grouped_gemm():
    from enginesmith.runtime.kernels import triton_moe_rows

    model = tiny(TINY_MIXTRAL, device=KERNEL_DEVICE)
    w, cfg = model.layers[0], model.cfg
    x = torch.randn(12, cfg.hidden_size, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE)
    args = (x, w.router, w.fc, w.proj, cfg.moe_top_k, cfg.moe_normalization_mode == 1, model.experts.start)
    assert_close(moe_mlp(*args, rows_kernels=triton_moe_rows), moe_mlp(*args), 1e-5)


@needs_triton
def test_moe_decode_step_of_several_rows_runs_the_experts_through_the_rows_kernels():
    model = tiny(TINY_MIXTRAL, device=KERNEL_DEVICE)
    cache, seqs = prefilled(model, [6, 4, 9])
    fast_cache = copy.deepcopy(cache)
    ref = plain_forward(model, cache, [SeqSpan(s, p, 1) for s, p in zip(seqs, [6, 4, 9], strict=True)], [9, 2, 5])
    dec = FastDecoder(model, fast_cache, max_batch_size=4, max_seq_len=64, compile=False, gemv=True,
                      rope_kernel=INTERPRET or None, cuda_graphs=False, moe_rows=True)
    assert dec.step.moe_rows is not None, dec.status()["moe"]
    assert "grouped rows kernels" in dec.status()["moe"]
    assert_close(dec.decode(seqs, [9, 2, 5], [6, 4, 9]), ref, 1e-4)
    assert_close(fast_cache.k, cache.k, 1e-5)


def test_moe_rows_stay_off_on_cpu_unless_asked_and_failures_keep_the_grouped_gemm(monkeypatch):
    model = tiny(TINY_MIXTRAL)
    cache, _ = prefilled(model, [5])
    dec = FastDecoder(model, copy.deepcopy(cache), max_batch_size=2, max_seq_len=64, compile=False, gemv=False,
                      cuda_graphs=False)
    assert dec.step.moe_rows is None and "rows kernels" not in dec.status()["moe"]  # CPU default: off

    def broken(*a, **k):
        raise RuntimeError("no kernel for this card")

    monkeypatch.setattr("enginesmith.runtime.kernels.triton_moe_rows.grouped_swiglu", broken, raising=False)
    dec = FastDecoder(model, copy.deepcopy(cache), max_batch_size=2, max_seq_len=64, compile=False, gemv=False,
                      cuda_graphs=False, moe_rows=True)
    assert dec.step.moe_rows is None
    assert "grouped GEMM (rows kernels failed: RuntimeError: no kernel for this card)" in dec.status()["moe"]


def test_moe_rows_configs_come_from_the_tuned_table_unless_a_file_overrides_them(tmp_path, monkeypatch):
    from enginesmith.runtime.kernels import triton_gemv, triton_moe_rows

    assert triton_moe_rows.config_for(14336, 4096, True) == triton_moe_rows.TUNED.get(
        "moe-swiglu-14336x4096", triton_moe_rows.DEFAULT)
    path = tmp_path / "moe-rows.json"
    path.write_text('{"best": {"moe-swiglu-14336x4096": {"block_n": 32, "block_k": 256, "num_warps": 8, '
                    '"num_stages": 3}}}')
    monkeypatch.setenv("ENGINESMITH_MOE_ROWS_CONFIGS", str(path))
    triton_gemv.configs_from_env.cache_clear()
    try:
        assert triton_moe_rows.config_for(14336, 4096, True) == triton_moe_rows.RowsConfig(32, 256, 8, 3)
        assert triton_moe_rows.config_for(4096, 14336, False) == triton_moe_rows.TUNED.get(
            "moe-4096x14336", triton_moe_rows.DEFAULT)
    finally:
        triton_gemv.configs_from_env.cache_clear()


def test_configs_shrink_to_fit_shared_memory_for_float32_weights():
    from enginesmith.runtime.kernels.triton_moe_rows import SMEM_BUDGET, TUNED, RowsConfig, fit_smem, smem_bytes

    for key, cfg in TUNED.items():  # the tuned bf16 configs fit at the 32-row blocks they were tuned with
        assert fit_smem(cfg, 32, 2, key.startswith("moe-swiglu")) == cfg
    cfg = RowsConfig(64, 256, 4, 4)  # bf16, 32 rows: 3 x 96 KB failed to launch on an H200; 2 buffers fit
    assert smem_bytes(cfg, 32, 2, True) > SMEM_BUDGET and fit_smem(cfg, 32, 2, True) == RowsConfig(64, 256, 4, 3)
    small = fit_smem(RowsConfig(128, 512, 8, 3), 64, 4, True)  # float32: one buffer, then BLOCK_K halved
    assert small.num_stages == 1 and small.block_k == 128 and smem_bytes(small, 64, 4, True) <= SMEM_BUDGET
