"""Paged KV cache: a pool of fixed-size blocks and one block table per sequence.

Blocks hold `tokens_per_block` positions of every layer's K and V (TensorRT-LLM's paged KV cache).
A sequence owns the blocks in its table; they go back to the pool when the sequence is released
(finished, cancelled, failed or evicted), so the pool's free count returns to its starting size.
"""

from __future__ import annotations

from collections import deque

import torch


class KVCacheFullError(RuntimeError):
    """The pool has fewer free blocks than an allocation needs (the scheduler should have prevented it)."""


def blocks_for(num_tokens: int, tokens_per_block: int) -> int:
    """Blocks needed to hold `num_tokens` positions."""
    return -(-num_tokens // tokens_per_block)


def kv_cache_num_blocks(*, tokens_per_block: int, max_batch_size: int, max_seq_len: int,
                        bytes_per_token: int, max_tokens_in_paged_kv_cache: int | None = None,
                        free_mem_fraction: float = 0.9, free_bytes: int | None = None) -> int:
    """Number of blocks in the pool, sized like TensorRT-LLM's executor.

    The cache holds min(max_tokens_in_paged_kv_cache, free_mem_fraction * free memory) tokens, and
    never more than every sequence of a full batch at max_seq_len needs (more could never be used).
    `free_bytes` is the free device memory (None: not limited by memory).
    """
    if not 0.0 < free_mem_fraction <= 1.0:
        raise ValueError(f"kv_cache_free_gpu_mem_fraction={free_mem_fraction} must be in (0, 1]")
    limits = [max_batch_size * blocks_for(max_seq_len, tokens_per_block) * tokens_per_block]
    if max_tokens_in_paged_kv_cache:
        limits.append(max_tokens_in_paged_kv_cache)
    if free_bytes is not None:
        limits.append(int(free_mem_fraction * free_bytes) // bytes_per_token)
    num_blocks = min(limits) // tokens_per_block
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache would hold {min(limits)} tokens, less than one block of {tokens_per_block}: "
            "raise max_tokens_in_paged_kv_cache or kv_cache_free_gpu_mem_fraction")
    return num_blocks


class BlockPool:
    """Free list of block ids; allocation is all-or-nothing."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheFullError(f"need {n} KV blocks, only {len(self._free)} of {self.num_blocks} are free")
        return [self._free.popleft() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class PagedKVCache:
    """K and V storage of all layers: (layers, num_blocks, tokens_per_block, kv_heads, head_size) each."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_size: int, num_blocks: int,
                 tokens_per_block: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (num_layers, num_blocks, tokens_per_block, num_kv_heads, head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens_per_block = tokens_per_block
        self.pool = BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_size: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_size * torch.empty((), dtype=dtype).element_size()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.tokens_per_block)

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def new_blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Blocks `seq_id` must still get so that it can hold `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(self.block_table(seq_id)))

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Grow the block table of `seq_id` to hold `num_tokens` positions (raises KVCacheFullError)."""
        need = self.new_blocks_needed(seq_id, num_tokens)
        if need:
            self._tables.setdefault(seq_id, []).extend(self.pool.allocate(need))

    def adopt_tables(self, tables: dict[int, list[int]]) -> None:
        """Use the driver's block tables (ranks > 0 keep no allocator state of their own)."""
        self._tables = {int(k): list(v) for k, v in tables.items()}

    def release(self, seq_id: int) -> int:
        """Give all blocks of `seq_id` back to the pool; returns how many."""
        blocks = self._tables.pop(seq_id, [])
        self.pool.release(blocks)
        return len(blocks)

    def slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat slot index (block * tokens_per_block + offset) of positions [start, end) of `seq_id`, on the CPU."""
        table = torch.tensor(self.block_table(seq_id), dtype=torch.long)
        pos = torch.arange(start, end)
        if end > len(table) * self.tokens_per_block:
            raise KVCacheFullError(f"sequence {seq_id} has no KV block for position {end - 1}")
        return table[pos // self.tokens_per_block] * self.tokens_per_block + pos % self.tokens_per_block

    def layer_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K and V flattened to (num_blocks * tokens_per_block, kv_heads, head_size)."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])
