"""Batch-1 decode of a Mixtral MoE block in three Triton-lang kernels, no host sync
(runtime/kernels/triton_gemv.py's K loop).

- `moe_router`: one program: RMSNorm of h, the float32 router logits, softmax, top-k (renormalized when asked)
  -> expert ids (TOP_K,) int32 and their weights (TOP_K,) float32, left on the device; the whole (E, H)
  router is one tile of 16 warps where it fits (Mixtral: 8 x 4096), so the program waits on two loads, not 16;
- `moe_up`: grid (outputs / BLOCK_N, TOP_K): program (n, c) reads expert ids[c]'s [up; gate] rows n (experts
  this rank does not own write zeros and read nothing) with RMSNorm folded in -> silu(gate) * up (TOP_K, I);
- `moe_down`: program n sums weight_c * (proj[ids[c]] rows n . act[c]) over the TOP_K choices, plus the
  residual when asked -> (1, H).
Weights are the converter's layout (runtime/model/model.py): fc (E_local, 2I, H) up then gate, proj (E_local, H, I),
router (E, H) float32; ids count from `first_expert` (expert parallelism). Roundings follow
runtime/decode_layers.moe_mlp (each expert's output and its weighted copy rounded to the activation dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from enginesmith.runtime.kernels.triton_gemv import _row_dots, _silu_mul, config_for


@triton.jit
def _router_kernel(H, NW, R, EIDX, PROB, K, eps, E: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr,
                   RENORM: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    offs_e = tl.arange(0, E_PAD)
    act_ty = H.dtype.element_ty
    ss = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(H + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
        ss += x * x
    rstd = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    logits = tl.zeros([E_PAD, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(H + kk, mask=kk < K, other=0.0).to(tl.float32)
        g = tl.load(NW + kk, mask=kk < K, other=0.0).to(tl.float32)
        xn = (g * (x * rstd).to(act_ty).to(tl.float32)).to(act_ty).to(tl.float32)  # rms_norm's roundings
        r = tl.load(R + offs_e[:, None] * K + kk[None, :], mask=(offs_e < E)[:, None] & (kk < K)[None, :], other=0.0)
        logits += r.to(tl.float32) * xn[None, :]
    lg = tl.where(offs_e < E, tl.sum(logits, 1), float("-inf"))
    ex = tl.exp(lg - tl.max(lg, 0))
    p = ex / tl.sum(ex, 0)
    total = 1.0
    if RENORM:
        left = p
        total = 0.0
        for _ in tl.static_range(TOP_K):
            total += tl.max(left, 0)
            left = tl.where(offs_e == tl.argmax(left, 0), -1.0, left)
    left = p
    for c in tl.static_range(TOP_K):
        best = tl.argmax(left, 0)
        tl.store(EIDX + c, best.to(tl.int32))
        tl.store(PROB + c, tl.max(left, 0) / total)
        left = tl.where(offs_e == best, -1.0, left)


@triton.jit
def _moe_up_kernel(X, W, NW, EIDX, OUT, N, K, eps, first_expert, e_local, EVEN_N: tl.constexpr,
                   EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    act_ty = X.dtype.element_ty
    e = tl.load(EIDX + c) - first_expert
    y = tl.zeros([BLOCK_N], tl.float32)
    if (e >= 0) & (e < e_local):
        up = W + e.to(tl.int64) * 2 * N * K + offs_n.to(tl.int64)[:, None] * K
        gate, lin, ss = _row_dots(X, NW, up + N * K, up, mask_n, K, True, True, EVEN_N, EVEN_K, PREFETCH,
                                  BLOCK_N, BLOCK_K)
        scale = tl.rsqrt(ss / K + eps)
        y = _silu_mul((gate * scale).to(act_ty).to(tl.float32), (lin * scale).to(act_ty).to(tl.float32), act_ty)
    tl.store(OUT + c * N + offs_n, y.to(OUT.dtype.element_ty), mask=mask_n)


@triton.jit
def _moe_down_kernel(X, W, EIDX, PROB, RES, OUT, N, K, first_expert, e_local, TOP_K: tl.constexpr,
                     RESIDUAL: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    act_ty = X.dtype.element_ty
    total = tl.zeros([BLOCK_N], tl.float32)
    for c in tl.static_range(TOP_K):
        e = tl.load(EIDX + c) - first_expert
        if (e >= 0) & (e < e_local):
            rows = W + e.to(tl.int64) * N * K + offs_n.to(tl.int64)[:, None] * K
            y, _, _ = _row_dots(X + c * K, X, rows, rows, mask_n, K, False, False, EVEN_N, EVEN_K, PREFETCH,
                                BLOCK_N, BLOCK_K)
            weight = tl.load(PROB + c).to(act_ty).to(tl.float32)
            total += (y.to(act_ty).to(tl.float32) * weight).to(act_ty).to(tl.float32)
    y = total.to(act_ty).to(tl.float32)
    if RESIDUAL:
        y = (tl.load(RES + offs_n, mask=mask_n, other=0.0).to(tl.float32) + y).to(act_ty).to(tl.float32)
    tl.store(OUT + offs_n, y.to(OUT.dtype.element_ty), mask=mask_n)


def moe_router(h: torch.Tensor, norm: torch.Tensor, eps: float, router: torch.Tensor, top_k: int,
               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h (1, H) -> (expert ids (top_k,) int32, weights (top_k,) float32) of RMSNorm(h)'s routing."""
    e, k = router.shape
    ids = torch.empty(top_k, dtype=torch.int32, device=h.device)
    prob = torch.empty(top_k, dtype=torch.float32, device=h.device)
    e_pad = max(2, triton.next_power_of_2(e))
    block_k = min(triton.next_power_of_2(k), max(512, 32768 // e_pad))  # Mixtral: 8 x 4096 in one tile
    _router_kernel[(1,)](h.contiguous(), norm, router.contiguous(), ids, prob, k, eps, E=e, E_PAD=e_pad,
                         TOP_K=top_k, RENORM=renormalize, BLOCK_K=block_k, num_warps=16 if block_k >= 2048 else 4)
    return ids, prob


def moe_up(h: torch.Tensor, fc: torch.Tensor, norm: torch.Tensor, eps: float, ids: torch.Tensor,
           first_expert: int) -> torch.Tensor:
    """silu(gate . x) * (up . x) of each chosen expert, x = RMSNorm(h) -> (top_k, I); zeros for experts of
    other ranks."""
    e_local, two_i, k = fc.shape
    n, top_k = two_i // 2, ids.shape[0]
    cfg = config_for(n, k, True, moe=True)
    out = torch.empty(top_k, n, dtype=h.dtype, device=h.device)
    _moe_up_kernel[(triton.cdiv(n, cfg.block_n), top_k)](
        h.contiguous(), fc, norm, ids, out, n, k, eps, first_expert, e_local, EVEN_N=n % cfg.block_n == 0,
        EVEN_K=k % cfg.block_k == 0, PREFETCH=cfg.prefetch, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def moe_down(act: torch.Tensor, proj: torch.Tensor, ids: torch.Tensor, prob: torch.Tensor, first_expert: int,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """sum over choices c of prob[c] * proj[ids[c]] . act[c] (+ residual) -> (1, H)."""
    e_local, n, k = proj.shape
    cfg = config_for(n, k, False, moe=True)
    out = torch.empty(1, n, dtype=act.dtype, device=act.device)
    _moe_down_kernel[(triton.cdiv(n, cfg.block_n),)](
        act.contiguous(), proj, ids, prob, residual.contiguous() if residual is not None else act, out, n, k,
        first_expert, e_local, TOP_K=ids.shape[0], RESIDUAL=residual is not None, EVEN_N=n % cfg.block_n == 0,
        EVEN_K=k % cfg.block_k == 0, PREFETCH=cfg.prefetch, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
