"""The unfused arithmetic of one decode GEMV with its neighbours (runtime/kernels/triton_gemv.py fuses it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from enginesmith.runtime.model.layers import rms_norm
from enginesmith.runtime.model.layers import swiglu as swiglu_fn


def gemv_ref(x: torch.Tensor, w: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-6,
             swiglu: bool = False, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             out_f32: bool = False) -> torch.Tensor:
    """The unfused arithmetic `gemv` (one row) and `gemm_rows` (M rows) reproduce (runtime/model/layers.py's rms_norm
    and swiglu, F.linear): x (K,) or (M, K) -> (M, N)."""
    x = x.reshape(-1, x.shape[-1])
    if norm is not None:
        x = rms_norm(x, norm, eps)
    y = F.linear(x, w, bias)
    if swiglu:
        y = swiglu_fn(*y.chunk(2, dim=-1))
    if residual is not None:
        y = residual.reshape(x.shape[0], -1) + y
    return y.float() if out_f32 else y


def check_tol(dtype: torch.dtype) -> float:
    """Largest rel_err a fused kernel's start-up self-check accepts: float32 arithmetic matches to 1e-4; bf16 and
    fp16 round differently in fused and unfused order."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """|out - ref| / |ref| (Frobenius norms): the self-checks' measure of a fused kernel against the reference."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))
