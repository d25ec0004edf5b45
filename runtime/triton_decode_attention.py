"""Split-KV paged decode attention in Triton-lang (flash-decoding over TensorRT-LLM-style KV blocks).

Program (b, kv_head, split) walks positions [split * chunk, min((split + 1) * chunk, len_b)) of row b,
BLOCK_N at a time: block ids come from the row's block table, K/V tiles are loaded straight from the
cache (no gather copy), the G query heads that share the KV head are one (G_PAD, d) tile, and the
softmax is online. A second kernel merges the splits. Only each row's own positions are read, the
grid is fixed per batch size, and nothing syncs with the host, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(Q, K, V, BT, CTX, ACC, ML, sm_scale,
                  stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, TPB: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(CTX + b)
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
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
    row = (b * tl.num_programs(1) + h) * SPLITS + s
    tl.store(ACC + row * G_PAD * D + offs_g[:, None] * D + offs_d[None, :], acc)
    tl.store(ML + row * 2 * G_PAD + offs_g, m_i)
    tl.store(ML + row * 2 * G_PAD + G_PAD + offs_g, l_i)


@triton.jit
def _merge_kernel(ACC, ML, OUT, stride_ob, stride_oh,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    first = (b * tl.num_programs(1) + h) * SPLITS
    m_max = tl.full([G_PAD], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        m_max = tl.maximum(m_max, tl.load(ML + (first + s) * 2 * G_PAD + offs_g))
    l_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for s in tl.static_range(SPLITS):
        w = tl.exp(tl.load(ML + (first + s) * 2 * G_PAD + offs_g) - m_max)  # empty split: exp(-inf) = 0
        l_sum += w * tl.load(ML + (first + s) * 2 * G_PAD + G_PAD + offs_g)
        acc += w[:, None] * tl.load(ACC + (first + s) * G_PAD * D + offs_g[:, None] * D + offs_d[None, :])
    out = acc / l_sum[:, None]
    tl.store(OUT + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_g < G)[:, None])


class TritonDecodeAttention:
    """Callable (q (B, nq, d), k/v cache (blocks, tpb, nkv, d), block table (B, W), lengths (B,)) -> (B, nq, d)."""

    BLOCK_N = 64

    def __init__(self, q_heads: int, kv_heads: int, head_size: int, dtype: torch.dtype, max_batch_size: int):
        if q_heads % kv_heads:
            raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
        if head_size < 16 or head_size & (head_size - 1):
            raise ValueError(f"head_size={head_size}: the kernel needs a power of two >= 16")
        self.group = q_heads // kv_heads
        self.group_pad = max(16, triton.next_power_of_2(self.group))
        self.kv_heads, self.head_size, self.ieee = kv_heads, head_size, dtype == torch.float32
        self.num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    def splits(self, batch: int) -> int:
        """Enough (row, head, split) programs for about two waves over the SMs, at most 32 splits."""
        want = -(-2 * self.num_sms // (batch * self.kv_heads))
        return int(min(32, triton.next_power_of_2(max(1, want))))

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 context_lens: torch.Tensor) -> torch.Tensor:
        b, nq, d = q.shape
        splits = self.splits(b)
        acc = torch.empty(b, self.kv_heads, splits, self.group_pad, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(b, self.kv_heads, splits, 2, self.group_pad, dtype=torch.float32, device=q.device)
        out = torch.empty_like(q)
        q = q.contiguous()
        _split_kernel[(b, self.kv_heads, splits)](
            q, k_cache, v_cache, block_table, context_lens, acc, ml, d ** -0.5,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
            G=self.group, G_PAD=self.group_pad, D=d, TPB=k_cache.shape[1], BLOCK_N=self.BLOCK_N, SPLITS=splits,
            IEEE=self.ieee, num_warps=4, num_stages=2)
        _merge_kernel[(b, self.kv_heads)](
            acc, ml, out, out.stride(0), out.stride(1), G=self.group, G_PAD=self.group_pad, D=d, SPLITS=splits,
            num_warps=4)
        return out
