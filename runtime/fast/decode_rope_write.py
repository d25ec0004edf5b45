"""Rotary of q/k plus the paged KV-cache write of a decode step, as one opaque, in-place op.

Written inside a torch.compile'd region, the cache write is functionalized: Inductor fuses rotary
with index_copy into copies of the cache slice and then copies those back into the graph input (six
small kernels per layer on an H200 profile). Here the step calls `enginesmith::rope_cache_write`
(a torch.library custom op declaring that it mutates the two cache layers, so compile and CUDA
graphs treat it as opaque) outside the compiled regions. On CUDA it runs runtime/kernels/triton_rope_write.py
(one kernel per layer) once `RopeWriter` has checked it against the eager reference; otherwise, or
when that check fails (noted in `fallback`), the step uses the reference (compiled where asked).
"""

from __future__ import annotations

import logging

import torch

from enginesmith.runtime.model.layers import apply_rope, rope_cos_sin

log = logging.getLogger(__name__)


def rope_cache_write_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slots: torch.Tensor, src_rows: torch.Tensor, nq: int, nkv: int,
                         d: int) -> torch.Tensor:
    """The plain arithmetic: q (B, nq, d) rotated; row src_rows[b]'s rotated K and its V go into the cache
    layers (num_blocks, tpb, nkv, d) at flat slot slots[b] (padding rows repeat row 0)."""
    q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    q = apply_rope(q.reshape(-1, nq, d), cos, sin)
    k = apply_rope(k.reshape(-1, nkv, d), cos, sin)
    kf, vf = k_cache.view(-1, nkv, d), v_cache.view(-1, nkv, d)
    kf.index_copy_(0, slots, k.index_select(0, src_rows).to(kf.dtype))
    vf.index_copy_(0, slots, v.reshape(-1, nkv, d).index_select(0, src_rows).to(vf.dtype))
    return q


@torch.library.custom_op("enginesmith::rope_cache_write", mutates_args=("k_cache", "v_cache"))
def rope_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor, src_rows: torch.Tensor, nq: int, nkv: int, d: int,
                     kernel: bool) -> torch.Tensor:
    """rope_cache_write_ref's contract; `kernel` runs the Triton kernel (CUDA or TRITON_INTERPRET=1)."""
    if kernel:
        from enginesmith.runtime.kernels.triton_rope_write import rope_write

        return rope_write(qkv, cos, sin, k_cache, v_cache, slots, src_rows, nq, nkv, d)
    return rope_cache_write_ref(qkv, cos, sin, k_cache, v_cache, slots, src_rows, nq, nkv, d)


@rope_cache_write.register_fake
def _(qkv, cos, sin, k_cache, v_cache, slots, src_rows, nq, nkv, d, kernel):
    return qkv.new_empty(qkv.shape[0], nq, d)


class RopeWriter:
    """Decides once whether the fused kernel serves this model's shapes on this device."""

    def __init__(self, k_layer: torch.Tensor, nq: int, nkv: int, d: int, want_kernel: bool | None = None):
        """want_kernel: None tries it on CUDA only; True also tries it elsewhere (Triton's interpreter)."""
        self.nq, self.nkv, self.d = nq, nkv, d
        self.kernel, self.fallback = False, None
        self.note = "eager reference (no CUDA)"
        if want_kernel or (want_kernel is None and k_layer.device.type == "cuda"):
            self.kernel, self.note = _try_kernel(k_layer, nq, nkv, d)
            if not self.kernel:
                self.fallback = f"fused rotary + KV-cache write kernel unusable, using the reference: {self.note}"

    def __call__(self, qkv, cos, sin, k_cache, v_cache, slots, src_rows) -> torch.Tensor:
        return torch.ops.enginesmith.rope_cache_write(qkv, cos, sin, k_cache, v_cache, slots, src_rows,
                                                      self.nq, self.nkv, self.d, self.kernel)


def _try_kernel(k_layer: torch.Tensor, nq: int, nkv: int, d: int) -> tuple[bool, str]:
    try:
        from enginesmith.runtime.kernels.triton_rope_write import rope_write, supported
    except ImportError as e:
        return False, f"triton is not importable ({e})"
    qkv = k_layer.new_empty(1, (nq + 2 * nkv) * d)
    why = supported(qkv, k_layer, k_layer, d)
    if why:
        return False, why
    try:
        err = check_rope_write(rope_write, k_layer, nq, nkv, d)
    except Exception as e:  # a compile error of the kernel must not take the engine down
        log.warning("fused rope/cache-write kernel failed: %s", e)
        return False, f"{type(e).__name__}: {str(e)[:300]}"
    if not err < 2e-2:
        return False, f"self-check against the reference failed (relative error {err:.3g})"
    return True, f"fused kernel, self-check relative error {err:.1e}"


def check_rope_write(impl, k_layer: torch.Tensor, nq: int, nkv: int, d: int) -> float:
    """Largest relative error of `impl` (rope_cache_write_ref's signature) against the reference over q and
    the written slots, on random data with padding rows; inf if it touched any other cache element."""
    _, tpb = k_layer.shape[:2]
    dev, dt = k_layer.device, k_layer.dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    blocks, b, real = 6, 6, 4
    qkv = torch.randn(b, (nq + 2 * nkv) * d, device=dev, generator=gen).to(dt)
    pos = torch.tensor([3, 0, 17, 1000, 3, 3], device=dev)
    qkv[real:] = qkv[0]  # padding rows repeat row 0, as the decoder stages them
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
    cos, sin = rope_cos_sin(pos, inv, dt)
    perm = torch.randperm(blocks * tpb, device=dev, generator=gen)[:real]
    slots = torch.cat([perm, perm[:1].expand(b - real)])
    src = torch.tensor([0, 1, 2, 3, 0, 0], device=dev)
    caches = [torch.randn(blocks, tpb, nkv, d, device=dev, generator=gen).to(dt) for _ in range(2)]
    ref_k, ref_v = (c.clone() for c in caches)
    ref_q = rope_cache_write_ref(qkv, cos, sin, ref_k, ref_v, slots, src, nq, nkv, d)
    q = impl(qkv, cos, sin, caches[0], caches[1], slots, src, nq, nkv, d)
    hit = torch.zeros(blocks * tpb, dtype=torch.bool, device=dev)
    hit[slots] = True
    errs = [_rel(q, ref_q)]
    for out, ref in zip(caches, (ref_k, ref_v), strict=True):
        out, ref = out.view(-1, nkv, d), ref.view(-1, nkv, d)
        if not torch.equal(out[~hit], ref[~hit]):
            return float("inf")
        errs.append(_rel(out[hit], ref[hit]))
    return max(errs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))
