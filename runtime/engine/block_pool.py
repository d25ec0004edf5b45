"""The KV cache's block ids: reference counts, a free list, and the prefix cache's index of published blocks.

A published block is keyed by `block_hash`: its tokens chained to the key of the block before it, so equal keys
mean equal tokens from the start of the sequence (hence equal K/V). See runtime/engine/kv_cache.py for who publishes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence


class KVCacheFullError(RuntimeError):
    """The pool has fewer free blocks than an allocation needs (the scheduler should have prevented it)."""


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of a full block: its tokens chained to the key of the block before it (b"" for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Block ids with reference counts; allocation is all-or-nothing.

    Without reuse every block is free or held by one sequence. Published blocks (reuse) may be held by
    several sequences, and stay cached when none holds them; cached blocks count as free and are evicted,
    least recently released first, once the never-published free blocks run out.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # published, held by no sequence; LRU first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never-published free blocks and cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Published blocks no sequence holds (reusable until evicted)."""
        return len(self._cached)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise KVCacheFullError(f"need {n} KV blocks, only {self.num_free} of {self.num_blocks} are free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block = self._cached.popitem(last=False)[0]
                del self._block_of[self._key_of.pop(block)]  # evicted: its K/V will be overwritten
            self._refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become free (or cached, if published)."""
        for block in blocks:
            if self._refs[block] <= 0:
                raise ValueError(f"KV block {block} released more often than it was taken")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def lookup(self, key: bytes) -> int | None:
        """The published block with this key, if any."""
        return self._block_of.get(key)

    def acquire(self, blocks: list[int]) -> None:
        """Take one more reference to each published block (a cached one leaves the cache)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1

    def publish(self, block: int, key: bytes) -> bool:
        """Offer a held, fully computed block for reuse under `key`; False if another block has that key."""
        if key in self._block_of or block in self._key_of:
            return False
        self._key_of[block] = key
        self._block_of[key] = block
        return True
