"""Paged KV cache: a pool of fixed-size blocks and one block table per sequence.

Blocks hold `tokens_per_block` positions of every layer's K and V (TensorRT-LLM's paged KV cache).
A sequence holds the blocks in its table; they go back to the pool when the sequence is released
(finished, cancelled, failed or evicted), so the pool's free count returns to its starting size.

KV-cache reuse (`enable_reuse`, TensorRT-LLM's enable_kv_cache_reuse): a full block whose K/V are computed
is published under a chained hash of its tokens and every token before them (vLLM's and TensorRT-LLM's prefix
caching). A new sequence whose prompt starts with published blocks takes them into its table instead of
computing them again; at least one prompt token is always left to compute, so the step has logits to sample
from. Shared blocks are reference counted and only ever read: a sequence writes only positions past its
computed ones, which lie in its private, partially filled last block or in fresh blocks. A published block
no sequence holds stays cached and counts as free: allocation takes never-published blocks first, then
evicts cached ones, least recently released first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from enginesmith.runtime.engine.block_pool import BlockPool, KVCacheFullError, block_hash

__all__ = ["BlockPool", "KVCacheFullError", "PagedKVCache", "block_hash", "blocks_for", "kv_cache_num_blocks"]


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


class PagedKVCache:
    """K and V storage of all layers: (layers, num_blocks, tokens_per_block, kv_heads, head_size) each."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_size: int, num_blocks: int,
                 tokens_per_block: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 enable_reuse: bool = False):
        shape = (num_layers, num_blocks, tokens_per_block, num_kv_heads, head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens_per_block = tokens_per_block
        self.enable_reuse = enable_reuse
        self.pool = BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}
        self._keys: dict[int, list[bytes]] = {}  # seq_id -> keys of its leading full blocks (memo)
        self._offered: dict[int, int] = {}  # seq_id -> leading table blocks already published or shared
        self.reused_blocks = 0
        """Prompt blocks found cached at admission, over all admissions (reuse only)."""
        self.missed_blocks = 0
        """Prompt blocks that had to be computed at admission, over all admissions (reuse only)."""

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

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix (reuse only)."""
        return self.pool.num_cached

    def reserve(self, seq_id: int, num_tokens: int) -> int:
        """Grow the block table of `seq_id` to hold `num_tokens` positions (raises KVCacheFullError);
        returns how many blocks it allocated."""
        need = self.new_blocks_needed(seq_id, num_tokens)
        if need:
            self._tables.setdefault(seq_id, []).extend(self.pool.allocate(need))
        return need

    # ---- reuse ----
    def _block_keys(self, seq_id: int, tokens: Sequence[int], n: int) -> list[bytes]:
        """Keys of the first `n` full blocks of `tokens` (memoised per sequence: its tokens only grow)."""
        keys = self._keys.setdefault(seq_id, [])
        tpb = self.tokens_per_block
        for i in range(len(keys), n):
            keys.append(block_hash(keys[-1] if keys else b"", tokens[i * tpb: (i + 1) * tpb]))
        return keys[:n]

    def match_prefix(self, seq_id: int, tokens: Sequence[int]) -> list[int]:
        """Published blocks holding the longest block-aligned prefix of `tokens` that leaves at least one
        token to compute ([] without reuse). Nothing is taken yet: `attach` does that."""
        if not self.enable_reuse:
            return []
        hits = []
        for key in self._block_keys(seq_id, tokens, (len(tokens) - 1) // self.tokens_per_block):
            block = self.pool.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def admission_cost(self, hits: list[int], num_tokens: int) -> int:
        """Free blocks a sequence with an empty table takes to hold `num_tokens` positions when it shares
        `hits`: the blocks it allocates plus the cached ones it takes out of the cache."""
        return self.blocks_for(num_tokens) - len(hits) + sum(self.pool.refs(b) == 0 for b in hits)

    def attach(self, seq_id: int, hits: list[int], num_prompt_tokens: int) -> None:
        """Start the (empty) table of `seq_id` with the shared blocks `hits`, and count the prompt's blocks
        as reused or missed."""
        if not self.enable_reuse:
            return
        if self._tables.get(seq_id):
            raise ValueError(f"sequence {seq_id} already holds KV blocks; only an empty table can share a prefix")
        self.reused_blocks += len(hits)
        self.missed_blocks += max(0, self.blocks_for(num_prompt_tokens) - len(hits))
        if hits:
            self.pool.acquire(hits)
            self._tables[seq_id] = list(hits)
            self._offered[seq_id] = len(hits)

    def publish(self, seq_id: int, tokens: Sequence[int], num_computed: int) -> int:
        """Publish the full blocks of `seq_id` whose `num_computed` leading positions are computed (reuse only;
        a block whose key another block already has stays private). Returns how many it newly offered."""
        if not self.enable_reuse:
            return 0
        table = self._tables.get(seq_id, [])
        full = min(num_computed // self.tokens_per_block, len(table))
        done = self._offered.get(seq_id, 0)
        if full <= done:
            return 0
        keys = self._block_keys(seq_id, tokens, full)
        for i in range(done, full):
            self.pool.publish(table[i], keys[i])
        self._offered[seq_id] = full
        return full - done

    def adopt_tables(self, tables: dict[int, list[int]]) -> None:
        """Use the driver's block tables (ranks > 0 keep no allocator state of their own)."""
        self._tables = {int(k): list(v) for k, v in tables.items()}

    def release(self, seq_id: int) -> int:
        """Give all blocks of `seq_id` back to the pool; returns how many. With reuse, publish its computed
        blocks first (`publish`); they are released last block first, so a sequence's tail is evicted before
        the prefix it may share."""
        blocks = self._tables.pop(seq_id, [])
        self._keys.pop(seq_id, None)
        self._offered.pop(seq_id, None)
        self.pool.release(blocks[::-1] if self.enable_reuse else blocks)
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
