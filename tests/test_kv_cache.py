"""Paged KV cache (block pool, block tables, sizing) and paged attention against dense causal attention."""

from __future__ import annotations

import pytest
import torch

from enginesmith.runtime.model.attention import DenseCausalAttention
from enginesmith.runtime.engine.kv_cache import BlockPool, KVCacheFullError, PagedKVCache, kv_cache_num_blocks
from enginesmith.runtime.model.paged_attention import PagedAttention, SeqSpan


def test_block_pool_is_all_or_nothing_and_returns_blocks():
    pool = BlockPool(5)
    got = pool.allocate(3)
    assert len(set(got)) == 3 and pool.num_free == 2 and pool.num_used == 3
    with pytest.raises(KVCacheFullError, match="need 3 KV blocks, only 2"):
        pool.allocate(3)
    assert pool.num_free == 2  # a failed allocation takes nothing
    pool.release(got)
    assert pool.num_free == 5


def test_sizing_takes_the_smallest_limit():
    common = dict(tokens_per_block=32, max_batch_size=4, max_seq_len=100, bytes_per_token=1000)
    # batch limit: 4 sequences x ceil(100/32)=4 blocks
    assert kv_cache_num_blocks(**common) == 16
    assert kv_cache_num_blocks(**common, max_tokens_in_paged_kv_cache=100) == 3
    assert kv_cache_num_blocks(**common, free_bytes=10 * 32 * 1000, free_mem_fraction=0.5) == 5
    with pytest.raises(ValueError, match="kv_cache_free_gpu_mem_fraction=1.5"):
        kv_cache_num_blocks(**common, free_mem_fraction=1.5)
    with pytest.raises(ValueError, match="less than one block"):
        kv_cache_num_blocks(**common, max_tokens_in_paged_kv_cache=10)


def _cache(num_blocks=12, tpb=4, layers=2):
    return PagedKVCache(num_layers=layers, num_kv_heads=2, head_size=8, num_blocks=num_blocks, tokens_per_block=tpb)


def test_block_tables_grow_by_block_and_release_to_the_starting_size():
    cache = _cache()
    start = cache.num_free_blocks
    cache.reserve(1, 5)  # 2 blocks
    cache.reserve(2, 4)  # 1 block
    cache.reserve(1, 8)  # still 2 blocks
    assert len(cache.block_table(1)) == 2 and len(cache.block_table(2)) == 1
    assert cache.new_blocks_needed(1, 9) == 1 and cache.new_blocks_needed(2, 3) == 0
    b1 = cache.block_table(1)
    assert cache.slots(1, 3, 6).tolist() == [b1[0] * 4 + 3, b1[1] * 4 + 0, b1[1] * 4 + 1]
    with pytest.raises(KVCacheFullError, match="no KV block for position 8"):
        cache.slots(1, 0, 9)
    assert cache.release(1) == 2 and cache.release(2) == 1 and cache.release(3) == 0
    assert cache.num_free_blocks == start and cache.num_used_blocks == 0


def _dense(q, k, v):
    return DenseCausalAttention([q.shape[0]])(0, q, k, v)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paged_attention_matches_dense_causal_over_mixed_steps(dtype, tol):
    """Three steps mixing whole prompts, prefill chunks and decodes over interleaved, non-contiguous blocks."""
    torch.manual_seed(0)
    nh, nkv, d = 8, 2, 8
    lengths = {0: 7, 1: 11, 2: 4, 3: 1, 4: 9}
    full = {s: (torch.randn(n, nh, d, dtype=dtype), torch.randn(n, nkv, d, dtype=dtype),
                torch.randn(n, nkv, d, dtype=dtype)) for s, n in lengths.items()}
    per_layer = [lambda q, k, v: (q, k, v), lambda q, k, v: (q, 2 * k, -v)]  # layers must not share storage
    expected = {(layer, s): _dense(*f(*full[s])) for s in full for layer, f in enumerate(per_layer)}
    cache = PagedKVCache(num_layers=2, num_kv_heads=nkv, head_size=d, num_blocks=40, tokens_per_block=4,
                         dtype=dtype)
    cache.reserve(99, 8)  # a foreign sequence, so tables are not contiguous from block 0
    steps = [
        [SeqSpan(0, 0, 6), SeqSpan(1, 0, 5), SeqSpan(4, 0, 4)],  # prompt 0 minus its last token, chunks
        [SeqSpan(0, 6, 1), SeqSpan(1, 5, 6), SeqSpan(2, 0, 4), SeqSpan(3, 0, 1), SeqSpan(4, 4, 4)],
        [SeqSpan(4, 8, 1)],  # a lone decode
    ]
    for spans in steps:
        for s in spans:
            cache.reserve(s.seq_id, s.end)
        attn = PagedAttention(cache, spans)
        pick = [(s, slice(s.start, s.end)) for s in spans]
        q, k, v = (torch.cat([full[s.seq_id][j][sl] for s, sl in pick]) for j in range(3))
        for layer, f in enumerate(per_layer):
            out = attn(layer, *f(q, k, v))
            row = 0
            for s, sl in pick:
                torch.testing.assert_close(out[row: row + s.num_tokens], expected[layer, s.seq_id][sl],
                                           atol=tol, rtol=tol)
                row += s.num_tokens


def test_paged_attention_rejects_a_token_count_mismatch():
    cache = _cache()
    cache.reserve(0, 3)
    attn = PagedAttention(cache, [SeqSpan(0, 0, 3)])
    with pytest.raises(ValueError, match="step has 3 tokens but attention got 2"):
        attn(0, torch.randn(2, 8, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8))


def _reuse_cache(num_blocks=6, tpb=4) -> PagedKVCache:
    return PagedKVCache(num_layers=1, num_kv_heads=1, head_size=2, num_blocks=num_blocks, tokens_per_block=tpb,
                        enable_reuse=True)


def _admit(cache: PagedKVCache, seq_id: int, tokens: list[int], computed: int | None = None) -> list[int]:
    """What the scheduler does: share the cached prefix, reserve the rest, and (after the step) publish."""
    hits = cache.match_prefix(seq_id, tokens)
    cache.attach(seq_id, hits, len(tokens))
    cache.reserve(seq_id, len(tokens))
    cache.publish(seq_id, tokens, len(tokens) if computed is None else computed)
    return hits


def test_reuse_shares_only_full_computed_blocks_of_the_same_chained_prefix():
    cache = _reuse_cache(num_blocks=20)
    a = list(range(10, 20))  # 10 tokens: blocks [10..13], [14..17] full, [18, 19] partial
    _admit(cache, 1, a, computed=7)
    assert cache.match_prefix(2, a + [5]) == cache.block_table(1)[:1]  # only block 0 was fully computed
    cache.publish(1, a, 10)
    first, second, partial = cache.block_table(1)
    assert cache.match_prefix(3, a + [5]) == [first, second]  # the partial last block stays private
    assert cache.match_prefix(4, a[:8]) == [first]  # a whole-prompt hit still leaves a token to compute
    assert cache.match_prefix(5, a[:4] + [0, 0, 0, 0, 1]) == [first]
    assert cache.match_prefix(6, [9] + a[1:] + [5]) == []  # the first block differs
    assert cache.match_prefix(7, [9, 9, 9, 9] + a[4:8] + [5]) == []  # same second block, other parent: no hit


def test_shared_blocks_are_reference_counted_and_cached_blocks_evicted_least_recently_released_first():
    cache = _reuse_cache(num_blocks=6)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 40, 41]
    assert _admit(cache, 1, a) == [] and cache.missed_blocks == 3
    a_blocks = cache.block_table(1)
    assert _admit(cache, 2, b) == a_blocks[:2]  # b shares a's two full blocks, gets one block of its own
    assert (cache.reused_blocks, cache.missed_blocks) == (2, 4)
    assert cache.num_used_blocks == 4 and cache.block_table(2)[:2] == a_blocks[:2]
    cache.release(1)
    assert cache.num_used_blocks == 3 and cache.num_cached_blocks == 0  # a's last block was partial: free
    cache.release(2)
    assert cache.num_free_blocks == 6 and cache.num_used_blocks == 0 and cache.num_cached_blocks == 2
    # A cached block taken back costs a free block; a hit on a held block does not.
    hits = cache.match_prefix(3, b)
    assert cache.admission_cost(hits, len(b)) == 3
    # Fill the pool: never-published blocks go first, then the cached ones, the tail (b's 2nd block) first.
    cache.reserve(9, 4 * 4)
    assert cache.num_cached_blocks == 2 and cache.num_free_blocks == 2
    cache.reserve(9, 5 * 4)
    assert cache.num_cached_blocks == 1 and cache.match_prefix(3, b) == a_blocks[:1]
    cache.release(9)
    assert cache.num_free_blocks == 6


def test_a_block_computed_twice_is_published_once_and_the_copy_stays_private():
    cache = _reuse_cache(num_blocks=6)
    prompt = [7, 7, 7, 7, 8]
    hits1, hits2 = cache.match_prefix(1, prompt), cache.match_prefix(2, prompt)  # both admitted in one step
    for seq, hits in ((1, hits1), (2, hits2)):
        cache.attach(seq, hits, len(prompt))
        cache.reserve(seq, len(prompt))
    for seq in (1, 2):
        cache.publish(seq, prompt, len(prompt))
    assert cache.match_prefix(3, prompt) == cache.block_table(1)[:1]
    cache.release(2)
    cache.release(1)
    assert cache.num_cached_blocks == 1 and cache.num_free_blocks == 6


def test_without_reuse_nothing_is_matched_published_or_counted():
    cache = _cache()
    prompt = list(range(9))
    cache.reserve(1, 9)
    assert cache.publish(1, prompt, 9) == 0 and cache.match_prefix(2, prompt) == []
    cache.attach(2, [], 9)
    cache.release(1)
    assert cache.num_cached_blocks == 0 and cache.num_free_blocks == cache.num_blocks
    assert (cache.reused_blocks, cache.missed_blocks) == (0, 0)


def test_releasing_a_block_twice_is_an_error():
    pool = BlockPool(2)
    got = pool.allocate(1)
    pool.release(got)
    with pytest.raises(ValueError, match="released more often than it was taken"):
        pool.release(got)
