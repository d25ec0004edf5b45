"""Attention backend without a cache: packed sequences, causal within each sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseCausalAttention:
    """For whole prompts in one pass (the conversion oracle); `seq_lens` splits the packed T tokens."""

    def __init__(self, seq_lens: list[int]):
        self.seq_lens = seq_lens

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (T, nq, d); k, v: (T, nkv, d) -> (T, nq, d)
        outs, start = [], 0
        groups = q.shape[1] // k.shape[1]
        for n in self.seq_lens:
            qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # (heads, n, d)
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
            start += n
        return torch.cat(outs, dim=0)
