"""Graph-safe decode attention over the paged KV cache: fixed shapes, all indexing on the device.

Inputs are the static buffers of a decode step (the step's K/V are already in the cache): per row its block
table (padded to a fixed width with block 0) and its context length (keys at positions < length are
valid). Two implementations with one signature:

- `gather`: gathers K/V through the first `num_blocks` columns of the block table and runs SDPA with a
  length mask (plain PyTorch, runs anywhere; reads num_blocks * tokens_per_block keys for every row);
- `triton`: a Triton-lang split-KV kernel that walks each row's own blocks only (CUDA; see
  runtime/kernels/triton_decode_attention.py), checked against `gather` before it is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class DecodeBatch:
    """Device views of one decode step (rows past the real batch repeat row 0)."""

    slots: torch.Tensor
    """(B,) int64 flat cache slot of each row's new token."""
    src_rows: torch.Tensor
    """(B,) int64 row whose K/V each row writes (padding rows write row 0's values to row 0's slot)."""
    block_table: torch.Tensor
    """(B, max_blocks) int64."""
    context_lens: torch.Tensor
    """(B,) int64 keys each row attends to (position + 1)."""
    num_blocks: int
    """Block-table columns the gather implementation reads (a bucket >= every row's block count)."""


def gather_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
    """q (B, nq, d) over each row's first context_lens keys -> (B, nq, d).

    The G = nq / nkv query heads of a KV head form that head's query rows, so K/V are never expanded."""
    b, nq, d = q.shape
    tpb, nkv = k_cache.shape[1], k_cache.shape[2]
    blocks = batch.block_table[:, : batch.num_blocks]
    length = batch.num_blocks * tpb
    keys = k_cache[blocks].reshape(b, length, nkv, d).transpose(1, 2).to(q.dtype)
    values = v_cache[blocks].reshape(b, length, nkv, d).transpose(1, 2).to(q.dtype)
    mask = torch.arange(length, device=q.device)[None, :] < batch.context_lens[:, None]
    out = F.scaled_dot_product_attention(q.reshape(b, nkv, nq // nkv, d), keys, values,
                                         attn_mask=mask[:, None, None, :])
    return out.reshape(b, nq, d)


class DecodeAttention:
    """Picks the implementation once: `triton` if asked (or auto on CUDA) and it passes its check."""

    def __init__(self, kind: str, q_heads: int, kv_cache: torch.Tensor, max_batch_size: int, pdl: bool = False):
        """pdl: launch the Triton kernel with programmatic dependent launch (runtime/kernels/pdl.py)."""
        if kind not in ("auto", "triton", "gather"):
            raise ValueError(f"attention={kind!r}: choose auto, triton or gather")
        self.kind, self.reason = "gather", "requested" if kind == "gather" else ""
        self._triton = None
        self.fallbacks: list[str] = []
        if kind != "gather":
            self._triton, self.reason = _try_triton(q_heads, kv_cache, max_batch_size, pdl)
            if self._triton is not None and not self._triton.fused_merge:
                self.fallbacks.append(f"fused split merge unusable, two-kernel Triton attention: {self.reason}")
            if self._triton is not None:
                self.kind = "triton"
            elif kv_cache.device.type == "cuda":
                self.fallbacks.append(f"Triton decode attention unusable, gather attention: {self.reason}")
            if self._triton is None and kind == "triton":
                raise RuntimeError(f"attention='triton' is not usable here: {self.reason}")

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 batch: DecodeBatch) -> torch.Tensor:
        if self._triton is not None:
            return self._triton(q, k_cache, v_cache, batch.block_table, batch.context_lens,
                                batch.num_blocks * k_cache.shape[1])
        return gather_attention(q, k_cache, v_cache, batch)

    @property
    def needs_context_buckets(self) -> bool:
        """The gather implementation's cost grows with num_blocks, so steps pick the smallest bucket."""
        return self._triton is None


def _try_triton(q_heads: int, kv_cache: torch.Tensor, max_batch_size: int, pdl: bool = False):
    """The fused-merge kernel if it passes its self-check, else the two-kernel one if that does, else None."""
    if kv_cache.device.type != "cuda":
        return None, "the Triton kernel needs a CUDA device"
    try:
        from enginesmith.runtime.kernels.triton_decode_attention import TritonDecodeAttention
    except ImportError as e:
        return None, f"triton is not importable ({e})"
    why = ""
    for fused in (True, False):
        try:
            impl = TritonDecodeAttention(q_heads, kv_cache.shape[2], kv_cache.shape[3], kv_cache.dtype,
                                         max_batch_size, kv_cache.device, fused_merge=fused, pdl=pdl)
            err = check_splits(impl, q_heads, kv_cache)
        except Exception as e:  # a compile error of the kernel must not take the engine down: fall back
            log.warning("Triton decode attention (fused_merge=%s) unusable: %s", fused, e)
            why += f"fused_merge={fused}: {type(e).__name__}: {str(e)[:300]}; "
            continue
        if err < 2e-2:
            return impl, f"{why}self-check relative error {err:.2e} (fused_merge={fused})"
        why += f"fused_merge={fused}: self-check against gather failed (relative error {err:.3g}); "
    return None, why


def check_splits(impl, q_heads: int, kv_cache: torch.Tensor) -> float:
    """Worst check_against_gather error of a TritonDecodeAttention over its own split choice, one split (the
    direct write) and 32 splits (most partials to merge), each run three times (a merge race shows as a miss)."""
    errs = []
    for forced in (None, 1, 32):
        impl.splits_override = forced
        errs += [check_against_gather(impl, q_heads, kv_cache) for _ in range(3)]
    impl.splits_override = None
    return max(errs)


def check_against_gather(impl, q_heads: int, kv_cache: torch.Tensor) -> float:
    """Relative error of `impl` against gather_attention on random data, mixed lengths, shuffled blocks.
    kv_cache: one layer's cache (blocks, tpb, nkv, d), giving the shapes and dtype to check with."""
    _, tpb, nkv, d = kv_cache.shape
    dev, dt = kv_cache.device, kv_cache.dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    width, lens = 24, [1, 2, tpb, tpb + 1, 5 * tpb - 3, 24 * tpb, 17 * tpb + 7]
    num_blocks = width * len(lens)
    k = torch.randn(num_blocks, tpb, nkv, d, device=dev, generator=gen).to(dt)
    v = torch.randn(num_blocks, tpb, nkv, d, device=dev, generator=gen).to(dt)
    q = torch.randn(len(lens), q_heads, d, device=dev, generator=gen).to(dt)
    table = torch.randperm(num_blocks, device=dev, generator=gen).view(len(lens), width)
    ctx = torch.tensor(lens, device=dev)
    batch = DecodeBatch(ctx, ctx, table, ctx, width)
    ref = gather_attention(q.float(), k.float(), v.float(), batch)
    out = impl(q, k, v, table, ctx).float()
    return float((out - ref).norm() / ref.norm())
