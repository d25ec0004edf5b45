"""Batch-1 decode GEMVs in Triton-lang with their neighbours fused in: one kernel per projection.

y = W x for one token (x: (K,), W: (N, K) row-major, bf16/fp16/fp32), with optional
- NORM: x is RMSNorm(x) * norm_weight: every program sums x's squares in the same pass over K and scales
  its dot products by 1/rms at the end (so the normalized x is never rounded to bf16, the one difference
  from the reference), and the norm before qkv, gate/up and lm_head costs no kernel or pass of its own;
- SWIGLU: W is the fused [fc; gate] (2I, K) of runtime/layers.py; the program reads rows n and I + n and
  writes silu(fc x) * (gate x) (I,);
- BIAS: y + b (Qwen2's qkv bias);
- RESIDUAL: y + r, so o_proj and down write the new residual stream (for tp > 1 only rank 0 adds it, and
  the all-reduce of the partials yields h + sum of the partials);
- OUT_F32: the bf16-rounded result stored as float32 (the logits).
Each program owns BLOCK_N outputs and walks K in BLOCK_K steps with a (BLOCK_N, BLOCK_K) float32
accumulator reduced once at the end. Roundings otherwise follow the unfused reference (`gemv_ref`):
the GEMV output is rounded before silu and before the residual add. Launch configs per shape come from
`config_for` (tuned on an H200 by benchmarks/gemv_kernels.py) or from ENGINESMITH_GEMV_CONFIGS (a JSON
file of that benchmark).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from runtime.gemv_ref import gemv_ref  # noqa: F401  (the arithmetic these kernels reproduce)


@triton.jit
def _gemv_kernel(X, W, NW, B, RES, OUT, N, K, HALF, eps,
                 NORM: tl.constexpr, SWIGLU: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                 OUT_F32: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    act_ty = X.dtype.element_ty
    rows = W + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if SWIGLU:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if NORM:
        ss = tl.zeros([BLOCK_K], tl.float32)
    if PREFETCH:  # the first tiles; each iteration then loads the next before using the current
        w_next = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
        if SWIGLU:
            w2_next = tl.load(rows + HALF * K + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                              other=0.0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            x = tl.load(X + kk).to(tl.float32)
        else:
            x = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
        if NORM:  # sum of squares in the same pass; 1/rms scales the dot products at the end
            ss += x * x
            if EVEN_K:
                x = x * tl.load(NW + kk).to(tl.float32)
            else:
                x = x * tl.load(NW + kk, mask=kk < K, other=0.0).to(tl.float32)
        xf = x[None, :]
        if PREFETCH:
            w = w_next
            nk = kk + BLOCK_K
            w_next = tl.load(rows + nk[None, :], mask=mask_n[:, None] & (nk < K)[None, :], other=0.0)
        elif EVEN_N and EVEN_K:
            w = tl.load(rows + kk[None, :])
        else:
            w = tl.load(rows + kk[None, :], mask=mask_n[:, None] & (kk < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * xf
        if SWIGLU:
            if PREFETCH:
                w2 = w2_next
                w2_next = tl.load(rows + HALF * K + nk[None, :], mask=mask_n[:, None] & (nk < K)[None, :],
                                  other=0.0)
            elif EVEN_N and EVEN_K:
                w2 = tl.load(rows + HALF * K + kk[None, :])
            else:
                w2 = tl.load(rows + HALF * K + kk[None, :], mask=mask_n[:, None] & (kk < K)[None, :], other=0.0)
            acc2 += w2.to(tl.float32) * xf
    scale = 1.0
    if NORM:
        scale = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    y = tl.sum(acc, 1) * scale
    if BIAS:
        y += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = y.to(act_ty).to(tl.float32)
    if SWIGLU:
        lin = (tl.sum(acc2, 1) * scale).to(act_ty).to(tl.float32)
        silu = (y / (1.0 + tl.exp(-y))).to(act_ty).to(tl.float32)
        y = (silu * lin).to(act_ty).to(tl.float32)
    if RESIDUAL:
        y = (tl.load(RES + offs_n, mask=mask_n, other=0.0).to(tl.float32) + y).to(act_ty).to(tl.float32)
    if OUT_F32:
        tl.store(OUT + offs_n, y, mask=mask_n)
    else:
        tl.store(OUT + offs_n, y.to(OUT.dtype.element_ty), mask=mask_n)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    prefetch: bool = False
    """Load the next K tile before multiplying the current one (two tiles in flight per program)."""

    def key(self) -> str:
        return f"{'pf-' if self.prefetch else ''}n{self.block_n}-k{self.block_k}-w{self.num_warps}-s{self.num_stages}"


DEFAULT = GemvConfig(8, 512, 4, 1)
"""Used for shapes the tuned table has no entry for."""

TUNED: dict[str, GemvConfig] = {}
"""Best config per shape class (`shape_key`) measured by benchmarks/gemv_kernels.py on an H200."""


def shape_key(n: int, k: int, swiglu: bool) -> str:
    return f"{'swiglu-' if swiglu else ''}{n}x{k}"


@lru_cache(maxsize=1)
def _file_configs() -> dict[str, GemvConfig]:
    path = os.environ.get("ENGINESMITH_GEMV_CONFIGS")
    if not path:
        return {}
    best = json.loads(open(path).read()).get("best", {})
    return {k: GemvConfig(**v) for k, v in best.items()}


def config_for(n: int, k: int, swiglu: bool) -> GemvConfig:
    key = shape_key(n, k, swiglu)
    return _file_configs().get(key) or TUNED.get(key) or DEFAULT


def gemv(x: torch.Tensor, w: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-6,
         swiglu: bool = False, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
         out_f32: bool = False, config: GemvConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (1, K) or (K,) -> (1, N) (N = w.shape[0], or half of it with swiglu); see the module docstring."""
    k = x.shape[-1]
    if x.numel() != k:
        raise ValueError(f"gemv takes one row, got x of shape {tuple(x.shape)}")
    if w.shape[1] != k or not w.is_contiguous():
        raise ValueError(f"weight {tuple(w.shape)} (contiguous) does not match x's {k} features")
    n = w.shape[0] // 2 if swiglu else w.shape[0]
    cfg = config or config_for(n, k, swiglu)
    if out is None:
        out = torch.empty(1, n, dtype=torch.float32 if out_f32 else x.dtype, device=x.device)
    x = x.contiguous()
    dummy = x
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, w, norm if norm is not None else dummy, bias if bias is not None else dummy,
        residual.contiguous() if residual is not None else dummy, out, n, k, n, eps,
        NORM=norm is not None, SWIGLU=swiglu, BIAS=bias is not None, RESIDUAL=residual is not None,
        OUT_F32=out_f32, EVEN_N=n % cfg.block_n == 0, EVEN_K=k % cfg.block_k == 0, PREFETCH=cfg.prefetch,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
