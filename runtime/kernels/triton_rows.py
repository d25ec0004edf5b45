"""Small-batch decode projections in Triton-lang: the fused GEMV's neighbours for 2..64 rows, on tensor cores.

y = x W^T for M tokens (x: (M, K), W: (N, K) row-major) with the options of runtime/kernels/triton_gemv.py's
`gemv`: NORM (RMSNorm of each row first), SWIGLU ([fc; gate] rows n and I + n, silu(fc x) * (gate x)),
BIAS, RESIDUAL and OUT_F32. At batch 32 the cuBLAS regions path spends, per dense layer, four
RMSNorm / SiLU kernels and two split-K reductions next to its four GEMMs, each with a launch gap inside
the CUDA graph (decode-profile-h200-b32.json); here a layer is two small RMSNorm kernels and four
projection kernels, all launched with programmatic dependent launch on Hopper. Opt-in
(ENGINESMITH_GEMM_ROWS=1 or FastDecoder(rows=True)): measured in the decode step at 32 rows on an H200 they
lost to cuBLAS's GEMMs with the compiled regions by 3-4% at tp 1 and 2 (runtime-h200-x2-tp-rows.json;
cuBLAS splits K for the narrow qkv projection and streams gate/up faster, gemm-rows-h200.json).

Each projection program owns BLOCK_N output columns for all M rows (BLOCK_M = M padded to 16 or more) and
walks K in BLOCK_K steps with tl.dot, software-pipelined by Triton; the weights stream once, the rows of
x come from L2 for every program. RMSNorm is its own kernel (one program a row, runtime/model/layers.py's
roundings): folded into the projection's K loop as the GEMV kernels do it, the elementwise work on the
dot's operand cost 2-3.5x on the normed projections at 32 rows on an H200 (gemm-rows-h200.json).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from enginesmith.runtime.kernels.pdl import wait_then_release
from enginesmith.runtime.kernels.triton_gemv import _silu_mul, configs_from_env, residual_store

MAX_ROWS = 64


@triton.jit
def _rms_rows_kernel(X, NW, OUT, K, eps, PDL: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row of x -> weight * bf16(x * rsqrt(mean(x^2) + eps)), as runtime/layers.rms_norm rounds it."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    act_ty = X.dtype.element_ty
    wait_then_release(PDL)
    ss = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + row * K + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        ss += x * x
    r = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs
        x = tl.load(X + row * K + kk, mask=kk < K, other=0.0).to(tl.float32)
        nw = tl.load(NW + kk, mask=kk < K, other=0.0).to(tl.float32)
        tl.store(OUT + row * K + kk, ((x * r).to(act_ty).to(tl.float32) * nw).to(OUT.dtype.element_ty),
                 mask=kk < K)


@triton.jit
def k_loop(xp, wp, K, second, mask_m, mask_n, offs_k, TWO: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x tiles (xp: (BLOCK_M, BLOCK_K) pointers at k = 0) times W^T tiles (wp: (BLOCK_K, BLOCK_N)) over K on tensor
    cores -> float32 (acc, acc2): acc2 from the rows `second` elements past wp's (TWO; else 0.0). IEEE: float32
    products (the CPU / test dtype). Shared with runtime/kernels/triton_moe_rows.py; on an H200 neither kernel changed
    speed when it moved here (moe-rows-h200-helper.json, runtime-h200-x2-tp-helper.json's 32_rows rows)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = 0.0
    if TWO:
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(xp + k0, mask=mask_m[:, None], other=0.0)
            w = tl.load(wp + k0, mask=mask_n[None, :], other=0.0)
        else:
            kk = k0 + offs_k
            x = tl.load(xp + k0, mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
            w = tl.load(wp + k0, mask=mask_n[None, :] & (kk < K)[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        if TWO:
            if EVEN_K:
                w2 = tl.load(wp + second + k0, mask=mask_n[None, :], other=0.0)
            else:
                w2 = tl.load(wp + second + k0, mask=mask_n[None, :] & (kk < K)[:, None], other=0.0)
            if IEEE:
                acc2 = tl.dot(x, w2, acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(x, w2, acc2)
    return acc, acc2


@triton.jit
def _rows_kernel(X, W, B, RES, OUT, M, N, K, HALF,
                 SWIGLU: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, OUT_F32: tl.constexpr,
                 EVEN_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    act_ty = X.dtype.element_ty
    xp = X + offs_m[:, None] * K + offs_k[None, :]
    wp = W + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N): W^T tiles
    wait_then_release(PDL)
    acc, acc2 = k_loop(xp, wp, K, HALF * K, mask_m, mask_n, offs_k, SWIGLU, EVEN_K, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    y = acc
    if BIAS:
        y += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y.to(act_ty).to(tl.float32)
    if SWIGLU:
        y = _silu_mul(y, acc2.to(act_ty).to(tl.float32), act_ty)
    residual_store(y, RES, OUT, offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :], act_ty,
                   RESIDUAL, OUT_F32)


@dataclass(frozen=True)
class RowsConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4

    def key(self) -> str:
        return f"n{self.block_n}-k{self.block_k}-w{self.num_warps}-s{self.num_stages}"


DEFAULT = RowsConfig(32, 128, 4, 4)
"""For shapes and row counts the tuned table has no entry for."""

TUNED: dict[str, RowsConfig] = {
    "m32-6144x4096": RowsConfig(32, 128, 4, 5),  # qkv tp1
    "m32-4096x4096": RowsConfig(32, 128, 4, 5),  # o_proj tp1
    "m32-swiglu-14336x4096": RowsConfig(64, 128, 4, 3),  # gate_up tp1
    "m32-4096x14336": RowsConfig(32, 256, 4, 5),  # down tp1
    "m32-128256x4096": RowsConfig(64, 128, 4, 3),  # lm_head tp1
    "m32-3072x4096": RowsConfig(32, 256, 4, 5),  # qkv tp2
    "m32-4096x2048": RowsConfig(32, 128, 4, 5),  # o_proj tp2
    "m32-swiglu-7168x4096": RowsConfig(64, 128, 4, 5),  # gate_up tp2
    "m32-4096x7168": RowsConfig(32, 256, 4, 5),  # down tp2
    "m32-64128x4096": RowsConfig(64, 128, 4, 3),  # lm_head tp2
}
"""Best config per `shape_key` at 32 rows (Llama-3-8B at tp 1 and 2) from `benchmarks/kernels/gemv_kernels.py --rows 32`
on an H200 (gemm-rows-h200.json); other row buckets take DEFAULT. ENGINESMITH_ROWS_CONFIGS names a JSON file of
that benchmark whose entries win."""


def shape_key(m: int, n: int, k: int, swiglu: bool) -> str:
    return f"m{block_m(m)}-{'swiglu-' if swiglu else ''}{n}x{k}"


def block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def config_for(m: int, n: int, k: int, swiglu: bool) -> RowsConfig:
    return (TUNED | configs_from_env("ENGINESMITH_ROWS_CONFIGS", RowsConfig)).get(shape_key(m, n, k, swiglu), DEFAULT)


def gemm_rows(x: torch.Tensor, w: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-6,
              swiglu: bool = False, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              out_f32: bool = False, config: RowsConfig | None = None, out: torch.Tensor | None = None,
              pdl: bool = False) -> torch.Tensor:
    """x (M, K), 1 <= M <= MAX_ROWS -> (M, N) (N = w.shape[0], or half of it with swiglu); see the module
    docstring. pdl: launch with programmatic dependent launch (runtime/kernels/pdl.py)."""
    if x.dim() != 2 or not 0 < x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemm_rows takes (M, K) with 1 <= M <= {MAX_ROWS}, got x of shape {tuple(x.shape)}")
    m, k = x.shape
    if w.shape[1] != k or not w.is_contiguous():
        raise ValueError(f"weight {tuple(w.shape)} (contiguous) does not match x's {k} features")
    n = w.shape[0] // 2 if swiglu else w.shape[0]
    cfg = config or config_for(m, n, k, swiglu)
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32 if out_f32 else x.dtype, device=x.device)
    x = x.contiguous()
    if norm is not None:
        x = rms_rows(x, norm, eps, pdl)
    _rows_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, w, bias if bias is not None else x, residual.contiguous() if residual is not None else x, out, m, n, k,
        n, SWIGLU=swiglu, BIAS=bias is not None, RESIDUAL=residual is not None, OUT_F32=out_f32,
        EVEN_K=k % cfg.block_k == 0, IEEE=w.dtype == torch.float32, PDL=pdl, BLOCK_M=block_m(m),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        launch_pdl=pdl)
    return out


def rms_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False) -> torch.Tensor:
    """runtime/layers.rms_norm of each row of x (M, K) in one kernel launch."""
    out = torch.empty_like(x)
    _rms_rows_kernel[(x.shape[0],)](x, weight, out, x.shape[1], eps, PDL=pdl,
                                    BLOCK_K=min(1024, triton.next_power_of_2(x.shape[1])), num_warps=4,
                                    launch_pdl=pdl)
    return out
