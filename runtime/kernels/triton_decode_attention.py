"""Split-KV paged decode attention in Triton-lang (flash-decoding over TensorRT-LLM-style KV blocks).

Program (b, kv_head, split) walks positions [split * chunk, min((split + 1) * chunk, len_b)) of row b,
BLOCK_N at a time: block ids come from the row's block table, K/V tiles are loaded straight from the
cache (no gather copy), the G query heads that share the KV head are one (G_PAD, d) tile, and the
softmax is online. The last split program of (b, kv_head) to finish merges the splits that hold keys
(unfused: a second kernel does; with one split the program writes the output itself). Only each row's own positions are
read, the grid is fixed per batch size, and nothing syncs with the host, so it can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from enginesmith.runtime.kernels.pdl import wait_then_release


@triton.jit
def _split_kernel(Q, K, V, BT, CTX, ACC, ML, OUT, LOCK, sm_scale,
                  stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb, stride_ob, stride_oh,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, TPB: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr, IEEE: tl.constexpr,
                  FUSED: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)  # q and the new token's K/V come from the kernel before
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(CTX + b)
    chunk = _chunk(ctx, SPLITS, BLOCK_N, MIN_CHUNK)
    start = s * chunk
    end = tl.minimum(start + chunk, ctx)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_g < G)[:, None], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        blk = tl.load(BT + b * stride_btb + pos // TPB, mask=valid, other=0).to(tl.int64)
        base = blk * stride_kb + (pos % TPB) * stride_kt + h * stride_kh
        k = tl.load(K + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(valid[None, :], qk * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if DIRECT:  # fused, one split: the program holds the whole row, so it writes the output itself
        tl.store(OUT + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=(offs_g < G)[:, None])
    else:
        first = (b * tl.num_programs(1) + h) * SPLITS
        tl.store(ACC + (first + s) * G_PAD * D + offs_g[:, None] * D + offs_d[None, :], acc,
                 mask=(offs_g < G)[:, None])
        tl.store(ML + (first + s) * 2 * G_PAD + offs_g, m_i)
        tl.store(ML + (first + s) * 2 * G_PAD + G_PAD + offs_g, l_i)
        if FUSED:  # the last split of (b, h) to finish merges: no second kernel
            tl.debug_barrier()  # every thread's partials are stored before the release below
            lock = LOCK + b * tl.num_programs(1) + h
            done = tl.atomic_add(lock, 1, sem="acq_rel")
            if done == SPLITS - 1:
                _merge(ACC, ML, OUT, first, b * stride_ob + h * G * stride_oh, stride_oh, tl.cdiv(ctx, chunk),
                       G, G_PAD, D, SPLITS, ".cg")
                tl.atomic_xchg(lock, 0, sem="relaxed")  # ready for the next launch (graph replays reuse LOCK)


@triton.jit
def _chunk(ctx, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr):
    """Keys per split: the context over SPLITS, whole BLOCK_N tiles, at least MIN_CHUNK (a short context
    then fills fewer splits, and fewer partials are merged)."""
    return tl.maximum(tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N, MIN_CHUNK)


@triton.jit
def _merge(ACC, ML, OUT, first, out_off, stride_oh, active,
           G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, CACHE: tl.constexpr):
    """Merges the partials of splits [0, active): the ones holding keys (later splits of a short row are
    empty); only the G real query rows of the G_PAD-row tiles are read. The loops are unrolled so the
    loads of all splits are in flight together; masked-off splits read nothing."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    rows = offs_g < G
    m_max = tl.full([G_PAD], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        live = rows & (offs_g * 0 + s < active)  # a vector compare: a boolean mask in every Triton version
        m_max = tl.maximum(m_max, tl.load(ML + (first + s) * 2 * G_PAD + offs_g, mask=live,
                                          other=float("-inf"), cache_modifier=CACHE))
    l_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for s in tl.static_range(SPLITS):
        live = rows & (offs_g * 0 + s < active)
        w = tl.exp(tl.load(ML + (first + s) * 2 * G_PAD + offs_g, mask=live, other=float("-inf"),
                           cache_modifier=CACHE) - m_max)
        l_sum += w * tl.load(ML + (first + s) * 2 * G_PAD + G_PAD + offs_g, mask=live, other=0.0,
                             cache_modifier=CACHE)
        acc += w[:, None] * tl.load(ACC + (first + s) * G_PAD * D + offs_g[:, None] * D + offs_d[None, :],
                                    mask=live[:, None], other=0.0, cache_modifier=CACHE)
    out = acc / tl.where(rows, l_sum, 1.0)[:, None]
    tl.store(OUT + out_off + offs_g[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _merge_kernel(ACC, ML, OUT, CTX, stride_ob, stride_oh,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(CTX + b)
    chunk = _chunk(ctx, SPLITS, BLOCK_N, MIN_CHUNK)
    first = (b * tl.num_programs(1) + h) * SPLITS
    _merge(ACC, ML, OUT, first, b * stride_ob + h * G * stride_oh, stride_oh, tl.cdiv(ctx, chunk), G, G_PAD, D,
           SPLITS, "")


class TritonDecodeAttention:
    """Callable (q (B, nq, d), k/v cache (blocks, tpb, nkv, d), block table (B, W), lengths (B,)) -> (B, nq, d).

    fused_merge: the last split program of each (row, head) merges the partials (a per-(row, head) arrival
    counter in LOCK, reset by that program) and one split writes the output itself, so a step is one
    kernel; False: the original path (partials, then a separate merge kernel)."""

    BLOCK_N = 64
    MIN_CHUNK = 64
    """Keys a split takes at least (a multiple of BLOCK_N). On an H200 one BLOCK_N was fastest or within 3%
    at batch 1 and 32, contexts 640-8192 (benchmarks/results/attention-kernels-h200.json)."""

    def __init__(self, q_heads: int, kv_heads: int, head_size: int, dtype: torch.dtype, max_batch_size: int,
                 device: torch.device | str = "cuda", fused_merge: bool = True, min_chunk: int | None = None,
                 pdl: bool = False):
        if q_heads % kv_heads:
            raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
        if head_size < 16 or head_size & (head_size - 1):
            raise ValueError(f"head_size={head_size}: the kernel needs a power of two >= 16")
        self.group = q_heads // kv_heads
        self.group_pad = max(16, triton.next_power_of_2(self.group))
        self.kv_heads, self.head_size, self.ieee = kv_heads, head_size, dtype == torch.float32
        device = torch.device(device)
        self.pdl = pdl
        """Launch the split kernel with programmatic dependent launch (runtime/kernels/pdl.py)."""
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        self.fused_merge, self.max_rows = fused_merge, max(max_batch_size, 8)
        self.min_chunk = min_chunk or self.MIN_CHUNK
        if self.min_chunk % self.BLOCK_N:
            raise ValueError(f"min_chunk={self.min_chunk} is not a multiple of BLOCK_N={self.BLOCK_N}")
        self.lock = torch.zeros(self.max_rows * kv_heads, dtype=torch.int32, device=device)
        self.splits_override: int | None = None
        """Forces the split count (self-checks and tests)."""

    def splits(self, batch: int, max_len: int | None = None) -> int:
        """Enough (row, head, split) programs for about two waves over the SMs, at most 32 splits, and (when the
        longest possible context `max_len` is known) no more splits than that context fills with min_chunk
        keys each."""
        if self.splits_override:
            return self.splits_override
        want = -(-2 * self.num_sms // (batch * self.kv_heads))
        n = int(min(32, triton.next_power_of_2(max(1, want))))
        while max_len is not None and n > 1 and (n // 2) * self.min_chunk >= max_len:
            n //= 2  # halve only while half as many min_chunk splits still cover the longest context
        return n

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 context_lens: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        b, nq, d = q.shape
        if b > self.max_rows:
            raise ValueError(f"batch of {b} rows exceeds the {self.max_rows} this attention was built for")
        splits = self.splits(b, max_len)
        acc = torch.empty(b, self.kv_heads, splits, self.group_pad, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(b, self.kv_heads, splits, 2, self.group_pad, dtype=torch.float32, device=q.device)
        out = torch.empty_like(q)
        q = q.contiguous()
        _split_kernel[(b, self.kv_heads, splits)](
            q, k_cache, v_cache, block_table, context_lens, acc, ml, out, self.lock, d ** -0.5,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
            out.stride(0), out.stride(1),
            G=self.group, G_PAD=self.group_pad, D=d, TPB=k_cache.shape[1], BLOCK_N=self.BLOCK_N, SPLITS=splits,
            MIN_CHUNK=self.min_chunk, IEEE=self.ieee, FUSED=self.fused_merge, DIRECT=self.fused_merge and splits == 1,
            PDL=self.pdl, num_warps=4, num_stages=2, launch_pdl=self.pdl)
        if not self.fused_merge:  # the original two-kernel path, kept as the fallback
            _merge_kernel[(b, self.kv_heads)](
                acc, ml, out, context_lens, out.stride(0), out.stride(1), G=self.group, G_PAD=self.group_pad, D=d,
                SPLITS=splits, BLOCK_N=self.BLOCK_N, MIN_CHUNK=self.min_chunk, num_warps=4)
        return out
