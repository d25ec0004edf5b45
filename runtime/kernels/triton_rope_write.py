"""Rotary of q/k and the paged KV-cache write of one decode step as ONE Triton-lang kernel.

Program (b, head) takes one head of row b's fused qkv projection: a query head is rotated into q's
output; a KV head of row src_rows[b] is rotated (K) or copied (V) straight into the cache at slots[b].
Arithmetic in float32, rounded once at the store (as Inductor's fused rotary did). The cache is written
in place, so no functionalized copy of it exists anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_write_kernel(QKV, COS, SIN, SLOTS, SRC, QOUT, KC, VC,
                       stride_qkv, stride_cs, stride_qo, stride_slot,
                       NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)  # 0..NQ-1: a query head of row b; NQ..NQ+NKV-1: a KV head of row src_rows[b]
    is_q = (h < NQ).to(tl.int64)
    src = tl.load(SRC + b).to(tl.int64)
    row = b.to(tl.int64) * is_q + src * (1 - is_q)
    offs = tl.arange(0, D)
    half = D // 2
    partner = (offs + half) % D
    sign = tl.where(offs < half, -1.0, 1.0)
    c = tl.load(COS + row * stride_cs + offs).to(tl.float32)
    s = tl.load(SIN + row * stride_cs + offs).to(tl.float32)
    base = QKV + row * stride_qkv + h * D
    x = tl.load(base + offs).to(tl.float32)
    p = tl.load(base + partner).to(tl.float32)
    out = x * c + (sign * p) * s
    if h < NQ:
        tl.store(QOUT + b * stride_qo + h * D + offs, out.to(QOUT.dtype.element_ty))
    else:
        kh = h - NQ
        slot = tl.load(SLOTS + b).to(tl.int64)
        tl.store(KC + slot * stride_slot + kh * D + offs, out.to(KC.dtype.element_ty))
        v = tl.load(QKV + row * stride_qkv + (NQ + NKV + kh) * D + offs)
        tl.store(VC + slot * stride_slot + kh * D + offs, v.to(VC.dtype.element_ty))


def supported(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: int) -> str | None:
    """None when the kernel handles these tensors, else why not."""
    if d < 2 or d & (d - 1):
        return f"head_size={d} is not a power of two"
    if qkv.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "qkv rows or the cache layers are not contiguous"
    if k_cache.stride() != v_cache.stride():
        return "K and V cache layers have different strides"
    return None


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, slots: torch.Tensor, src_rows: torch.Tensor, nq: int, nkv: int,
               d: int) -> torch.Tensor:
    """qkv (B, (nq + 2 nkv) d), cos/sin (B, d), cache layers (blocks, tpb, nkv, d) -> rotated q (B, nq, d)."""
    b = qkv.shape[0]
    q = torch.empty(b, nq, d, dtype=qkv.dtype, device=qkv.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    _rope_write_kernel[(b, nq + nkv)](
        qkv, cos, sin, slots, src_rows, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), q.stride(0), nkv * d, NQ=nq, NKV=nkv, D=d, num_warps=1)
    return q
