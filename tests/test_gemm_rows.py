"""The small-batch projection kernels (runtime/kernels/triton_rows.py) against the unfused arithmetic.

They run on CUDA, or on CPU under Triton's interpreter (`make test`'s second pass); the argument checks
run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from enginesmith.runtime.kernels.gemv_ref import gemv_ref
from tests.test_decode_kernels import KERNEL_DEVICE, needs_triton

CASES = [  # (m, n, k, norm, swiglu, bias, residual, out_f32)
    (3, 48, 96, True, False, False, False, False),
    (5, 40, 64, True, True, False, False, False),
    (2, 64, 128, False, False, False, True, False),
    (7, 37, 100, True, False, True, False, True),
    (16, 32, 64, False, False, True, True, False),
    (33, 24, 64, True, True, False, False, False),  # BLOCK_M 64, padded rows masked
]


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg", [(16, 32, 4, 1), (32, 64, 4, 2)])
def test_rows_variants_match_the_unfused_arithmetic_row_by_row(case, cfg):
    from enginesmith.runtime.kernels.triton_rows import RowsConfig, gemm_rows

    m, n, k, norm, swiglu, bias, residual, out_f32 = case
    gen = torch.Generator().manual_seed(m * n * k)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(KERNEL_DEVICE)

    kw = dict(norm=1 + 0.1 * rnd(k) if norm else None, swiglu=swiglu, bias=rnd(n) if bias else None,
              out_f32=out_f32, eps=1e-5)
    x, w = rnd(m, k), rnd(2 * n if swiglu else n, k, scale=0.1)
    res = rnd(m, n) if residual else None
    out = torch.full((m, n), float("nan"), device=KERNEL_DEVICE)  # every element must be written
    y = gemm_rows(x, w, config=RowsConfig(*cfg), out=out, residual=res, **kw)
    for i in range(m):  # each row as the one-row reference computes it: rows do not mix
        ref = gemv_ref(x[i], w, residual=res[i] if residual else None, **kw)
        assert y[i: i + 1].dtype == ref.dtype
        assert float((y[i: i + 1] - ref).norm() / ref.norm()) < 1e-5, i


@needs_triton
def test_rows_kernel_in_bf16_stays_within_the_steps_tolerance():
    from enginesmith.runtime.kernels.triton_rows import gemm_rows

    if KERNEL_DEVICE == "cpu":
        pytest.skip("bf16 tensor-core products: CUDA only (the interpreter runs float32 above)")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 512, generator=gen).cuda().bfloat16()
    w = (torch.randn(2 * 256, 512, generator=gen) * 0.05).cuda().bfloat16()
    norm = (1 + 0.1 * torch.randn(512, generator=gen)).cuda().bfloat16()
    y = gemm_rows(x, w, norm=norm, swiglu=True, eps=1e-5)
    ref = gemv_ref(x, w, norm=norm, swiglu=True, eps=1e-5)
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) < 2e-2


def test_rows_kernel_refuses_bad_shapes_with_the_reason():
    from enginesmith.runtime.kernels.triton_rows import MAX_ROWS, gemm_rows

    with pytest.raises(ValueError, match="1 <= M <= 64"):
        gemm_rows(torch.zeros(MAX_ROWS + 1, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="1 <= M"):
        gemm_rows(torch.zeros(8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="does not match"):
        gemm_rows(torch.zeros(2, 8), torch.zeros(4, 6))


def test_rows_configs_file_overrides_the_table_by_row_bucket(tmp_path, monkeypatch):
    import json

    tr = pytest.importorskip("enginesmith.runtime.kernels.triton_rows")  # dev extra; nothing here launches a kernel
    from enginesmith.runtime.kernels.triton_gemv import configs_from_env

    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"best": {"m32-swiglu-7168x4096": dict(block_n=64, block_k=64, num_warps=4,
                                                                      num_stages=5)}}))
    monkeypatch.setenv("ENGINESMITH_ROWS_CONFIGS", str(path))
    configs_from_env.cache_clear()
    try:
        assert tr.shape_key(17, 7168, 4096, True) == "m32-swiglu-7168x4096"  # rows pad to a power of two
        assert tr.shape_key(3, 7168, 4096, True) == "m16-swiglu-7168x4096"  # and to 16 at least
        assert tr.config_for(20, 7168, 4096, True) == tr.RowsConfig(64, 64, 4, 5)
        assert tr.config_for(8, 7168, 4096, True) == tr.TUNED.get("m16-swiglu-7168x4096", tr.DEFAULT)
    finally:
        monkeypatch.delenv("ENGINESMITH_ROWS_CONFIGS")
        configs_from_env.cache_clear()
