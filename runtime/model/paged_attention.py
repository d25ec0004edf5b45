"""Attention over the paged KV cache for one mixed step: prefill chunks and decode tokens together.

The step's T tokens are packed sequence after sequence. Each sequence contributes a span of new
tokens at positions [start, start + num_tokens); earlier positions are already in its cache blocks.
The backend writes the new K/V into the blocks, then lets every query see the keys at positions
<= its own (causal), with grouped-query heads (query head h reads KV head h // (nh / nkv)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from enginesmith.runtime.model.attention import causal_sdpa
from enginesmith.runtime.engine.kv_cache import PagedKVCache


@dataclass(frozen=True, slots=True)
class SeqSpan:
    """One sequence's part of a step."""

    seq_id: int
    start: int
    """Positions already in the cache (the first new token's position)."""
    num_tokens: int
    """New tokens of this sequence in the step (a prefill chunk, or 1 for a decode)."""

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


class PagedAttention:
    """AttentionBackend for one step; build a new one per step after the blocks are reserved."""

    def __init__(self, cache: PagedKVCache, spans: list[SeqSpan]):
        self.cache = cache
        self.spans = spans
        device = cache.k.device  # index tensors are built on the CPU and moved once
        self.write_slots = torch.cat([cache.slots(s.seq_id, s.start, s.end) for s in spans]).to(device)
        offsets, row = [], 0
        for s in spans:
            offsets.append(row)
            row += s.num_tokens
        self.num_tokens = row
        decode = [i for i, s in enumerate(spans) if s.num_tokens == 1]
        self.prefill = [(offsets[i], s, cache.slots(s.seq_id, 0, s.end).to(device))
                        for i, s in enumerate(spans) if s.num_tokens > 1]
        self.decode_rows = torch.tensor([offsets[i] for i in decode], dtype=torch.long, device=device)
        slots, mask = self._padded_context([spans[i] for i in decode])
        self.decode_slots, self.decode_mask = slots.to(device), mask.to(device)

    def _padded_context(self, spans: list[SeqSpan]) -> tuple[torch.Tensor, torch.Tensor]:
        """Context slots of decode sequences padded to the longest: (B, L) slots and (B, L) validity."""
        longest = max((s.end for s in spans), default=0)
        slots = torch.zeros(len(spans), longest, dtype=torch.long)
        mask = torch.zeros(len(spans), longest, dtype=torch.bool)
        for b, s in enumerate(spans):
            slots[b, : s.end] = self.cache.slots(s.seq_id, 0, s.end)
            mask[b, : s.end] = True
        return slots, mask

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (T, nh, d); k, v: (T, nkv, d) -> (T, nh, d)
        if q.shape[0] != self.num_tokens:
            raise ValueError(f"step has {self.num_tokens} tokens but attention got {q.shape[0]}")
        k_cache, v_cache = self.cache.layer_views(layer)
        k_cache.index_copy_(0, self.write_slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, self.write_slots, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        if len(self.decode_rows):
            out[self.decode_rows] = self._decode(q[self.decode_rows], k_cache, v_cache)
        for row, span, ctx_slots in self.prefill:
            out[row: row + span.num_tokens] = self._prefill(q[row: row + span.num_tokens], span,
                                                            k_cache[ctx_slots], v_cache[ctx_slots])
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        # q: (B, nh, d); keys gathered to (B, nkv, L, d); padding masked out.
        keys = k_cache[self.decode_slots].transpose(1, 2).to(q.dtype)
        values = v_cache[self.decode_slots].transpose(1, 2).to(q.dtype)
        mask = self.decode_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True)
        return out[:, :, 0, :]

    @staticmethod
    def _prefill(q: torch.Tensor, span: SeqSpan, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # q: (n, nh, d) at positions start..end-1; keys/values: (end, nkv, d) at positions 0..end-1.
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        mask = None
        if span.start:
            q_pos = torch.arange(span.start, span.end, device=q.device)
            mask = torch.arange(span.end, device=q.device)[None, :] <= q_pos[:, None]
        return causal_sdpa(q[None], keys[None], values[None], mask)[0]
