"""Attention backend without a cache: packed sequences, causal within each sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseCausalAttention:
    """For whole prompts in one pass (the conversion oracle, the pipeline benchmark); `seq_lens` splits the
    packed T tokens. Sequences of one length go through one batched SDPA call."""

    def __init__(self, seq_lens: list[int]):
        self.seq_lens = seq_lens
        # Runs of consecutive equal lengths: (first row, length, count) -> one (count, heads, n, d) call each.
        self.runs: list[tuple[int, int, int]] = []
        row = 0
        for n in seq_lens:
            if self.runs and self.runs[-1][1] == n:
                first, _, count = self.runs[-1]
                self.runs[-1] = (first, n, count + 1)
            else:
                self.runs.append((row, n, 1))
            row += n
        self.num_tokens = row

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (T, nq, d); k, v: (T, nkv, d) -> (T, nq, d)
        if q.shape[0] != self.num_tokens:
            raise ValueError(f"seq_lens cover {self.num_tokens} tokens but attention got {q.shape[0]}")
        outs = [causal_sdpa(*(t[first:first + n * count].unflatten(0, (count, n)) for t in (q, k, v)))
                for first, n, count in self.runs]
        return outs[0].flatten(0, 1) if len(outs) == 1 else torch.cat([o.flatten(0, 1) for o in outs])


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n, nq, d) queries over (B, L, nkv, d) keys/values -> (B, n, nq, d); causal from position 0 unless
    `mask` ((n, L) bool, True = may attend) is given. 4-D inputs and grouped-query heads passed as such
    (enable_gqa) let CUDA pick a flash kernel; 3-D inputs or repeated KV heads fall back to the math path."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return out.transpose(1, 2)
