"""The fast decode path equals the plain engine path (CPU: static buffers, padded tables, no graphs).

Every check starts from two identical copies of a KV cache whose block tables are interleaved (not
contiguous), runs the same decode step through runtime/model/plain_step.py (PagedAttention, host indices)
and through FastDecoder, and compares logits and the whole cache afterwards.
"""

from __future__ import annotations

import copy

import pytest
import torch

from enginesmith.runtime.fast.decode_attention import DecodeBatch, check_against_gather, gather_attention
from enginesmith.runtime.fast.decode_layers import moe_mlp
from enginesmith.runtime.engine.engine import Engine
from enginesmith.runtime.engine.engine_config import EngineConfig
from enginesmith.runtime.fast.fast_decode import FAST_DECODE_ENV, FastDecoder, buckets
from enginesmith.runtime.engine.kv_cache import PagedKVCache
from enginesmith.runtime.model.layers import rms_norm
from enginesmith.runtime.model.paged_attention import SeqSpan
from enginesmith.runtime.model.plain_step import plain_forward
from enginesmith.runtime.model.random_model import TINY_LLAMA, TINY_MIXTRAL, checkpoint_config, random_rank_model
from enginesmith.runtime.engine.request import Request

TPB = 4


def tiny(shape=TINY_LLAMA, seed=1, device="cpu"):
    return random_rank_model(checkpoint_config(shape), seed=seed, device=device)


def prefilled(model, lens: list[int], extra: int = 8, seed: int = 0) -> tuple[PagedKVCache, list[int]]:
    """A cache holding random prompts of `lens` tokens (seq ids 100+i) with interleaved block tables."""
    cache = PagedKVCache(num_layers=model.num_local_layers, num_kv_heads=model.num_kv_heads,
                         head_size=model.head_size, num_blocks=96, tokens_per_block=TPB, device=model.device)
    for grow in range(1, max(lens) + extra + 1):  # one block at a time, round robin: fragmented tables
        for i, n in enumerate(lens):
            cache.reserve(100 + i, min(grow, n + extra))
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in lens]
    spans = [SeqSpan(100 + i, 0, n) for i, n in enumerate(lens)]
    plain_forward(model, cache, spans, [t for p in prompts for t in p])
    return cache, [100 + i for i in range(len(lens))]


def both(model, cache, seq_ids, ids, positions, **options):
    """(plain logits, fast logits, plain cache, fast cache, decoder) of one decode step from the same state."""
    fast_cache = copy.deepcopy(cache)
    ref = plain_forward(model, cache, [SeqSpan(s, p, 1) for s, p in zip(seq_ids, positions, strict=True)], ids)
    dec = FastDecoder(model, fast_cache, max_batch_size=8, max_seq_len=64, compile=False, **options)
    return ref, dec.decode(seq_ids, ids, positions), cache, fast_cache, dec


def assert_close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize("shape", [TINY_LLAMA, TINY_MIXTRAL], ids=["llama", "mixtral"])
def test_mixed_context_lengths_on_fragmented_tables_match_plain_path(shape):
    model = tiny(shape)
    lens = [5, 17, 1, 9, 30]
    cache, seqs = prefilled(model, lens)
    table = cache.block_table(seqs[1])
    assert table != list(range(table[0], table[0] + len(table)))  # not contiguous
    ref, out, c1, c2, dec = both(model, cache, seqs, [3, 7, 11, 13, 17], lens)
    assert out.shape == (5, model.cfg.vocab_size)
    assert_close(out, ref)
    assert_close(c2.k, c1.k, 1e-6)  # the new K/V landed in the same slots; padding rows wrote nothing else
    assert_close(c2.v, c1.v, 1e-6)
    assert dec.status()["attention"] == "gather"


@pytest.mark.parametrize("batch", [1, 3, 6, 8])
def test_batch_sizes_padded_to_a_bucket(batch):
    model = tiny()
    lens = [2 + 5 * i for i in range(batch)]
    cache, seqs = prefilled(model, lens)
    ids = [(7 * i + 1) % model.cfg.vocab_size for i in range(batch)]
    ref, out, c1, c2, _ = both(model, cache, seqs, ids, lens)
    assert_close(out, ref)
    assert_close(c2.k, c1.k, 1e-6)


def test_greedy_steps_match_plain_path_token_for_token():
    model = tiny()
    lens = [3, 11, 6]
    cache, seqs = prefilled(model, lens, extra=12)
    fast_cache = copy.deepcopy(cache)
    dec = FastDecoder(model, fast_cache, max_batch_size=4, max_seq_len=64, compile=False)
    plain_tok = fast_tok = [1, 2, 3]
    for step in range(10):
        pos = [n + step for n in lens]
        plain_tok = plain_forward(model, cache, [SeqSpan(s, p, 1) for s, p in zip(seqs, pos, strict=True)],
                                  plain_tok).argmax(-1).tolist()
        fast_tok = dec.decode(seqs, fast_tok, pos).argmax(-1).tolist()
        assert fast_tok == plain_tok, step


def test_token_ids_fed_as_a_device_tensor_step_like_host_lists():
    """The previous step's argmax fed back as a tensor (no host read per token): the same tokens and the same
    cache. Batch 3 runs in bucket 4, whose padding row must repeat row 0's id as it repeats its slot (on a GPU
    the two rows' K/V writes to that slot race)."""
    model = tiny()
    lens = [3, 11, 6]
    cache, seqs = prefilled(model, lens, extra=12)
    host_cache = copy.deepcopy(cache)
    on_host = FastDecoder(model, host_cache, max_batch_size=4, max_seq_len=64, compile=False)
    on_dev = FastDecoder(model, cache, max_batch_size=4, max_seq_len=64, compile=False)
    host_tok, dev_tok = [1, 2, 3], torch.tensor([1, 2, 3])
    for step in range(10):
        pos = [n + step for n in lens]
        host_ids = host_tok
        host_tok = on_host.decode(seqs, host_tok, pos).argmax(-1).tolist()
        dev_tok = on_dev.decode(seqs, dev_tok, pos).argmax(-1)
        assert dev_tok.tolist() == host_tok, step
        assert int(on_dev._dev[3]) == int(on_dev._dev[0]) == host_ids[0], step  # the staged ids: padding = row 0
    assert torch.equal(cache.k, host_cache.k) and torch.equal(cache.v, host_cache.v)
    with pytest.raises(ValueError, match="must be 1-d"):
        on_dev.decode(seqs, dev_tok.view(3, 1), pos)


def test_position_without_a_block_is_refused():
    model = tiny()
    cache, seqs = prefilled(model, [4], extra=0)  # blocks for positions 0..3 only
    dec = FastDecoder(model, cache, max_batch_size=2, max_seq_len=32, compile=False)
    with pytest.raises(ValueError, match="sequence 100 has no KV block for position 4"):
        dec.decode(seqs, [1], [4])
    with pytest.raises(ValueError, match="max_batch_size=2"):
        dec.decode([100, 100, 100], [1, 1, 1], [1, 1, 1])


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(80) == [1, 2, 4, 8, 16, 32, 64, 80]


def test_moe_split_over_expert_ranks_sums_to_the_whole():
    model = tiny(TINY_MIXTRAL)
    w = model.layers[0]
    h = torch.randn(6, model.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    x = rms_norm(h, w.post_layernorm, model.cfg.norm_epsilon)
    whole = moe_mlp(x, w.router, w.fc, w.proj, 2, True, 0)
    halves = moe_mlp(x, w.router, w.fc[:2], w.proj[:2], 2, True, 0) + moe_mlp(x, w.router, w.fc[2:], w.proj[2:], 2,
                                                                              True, 2)
    assert_close(whole, model.mlp_partial(0, h))
    assert_close(halves, whole)
    assert_close(moe_mlp(x, w.router, w.fc, w.proj, 2, True, 0, grouped=False), whole)  # the masked fallback


def test_kernel_check_accepts_gather_and_rejects_a_wrong_kernel():
    k_layer = torch.zeros(8, TPB, 2, 16)

    def right(q, k, v, table, ctx):
        return gather_attention(q, k, v, DecodeBatch(ctx, ctx, table, ctx, table.shape[1]))

    def off_by_one(q, k, v, table, ctx):  # forgets the newest key
        return gather_attention(q, k, v, DecodeBatch(ctx, ctx, table, (ctx - 1).clamp(min=1), table.shape[1]))

    assert check_against_gather(right, 4, k_layer) < 1e-6
    assert check_against_gather(off_by_one, 4, k_layer) > 2e-2


@pytest.mark.parametrize("shape", [TINY_LLAMA, TINY_MIXTRAL], ids=["llama", "mixtral"])
def test_engine_with_decode_hook_generates_the_plain_engines_tokens(shape, monkeypatch):
    model = tiny(shape, seed=2)
    config = EngineConfig(max_batch_size=4, max_input_len=24, max_seq_len=48, max_num_tokens=40, tokens_per_block=TPB)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 20, 9, 1, 14, 7)]

    def run(engine):
        reqs = [Request(p, 6 + i) for i, p in enumerate(prompts)]
        for r in reqs:
            engine.submit(r)
        engine.run_until_idle()
        return [r.output for r in reqs]

    expected = run(Engine(model, config))
    monkeypatch.setenv(FAST_DECODE_ENV, "on")  # the engine's own hook, eager on CPU
    hooked = Engine(model, config, decoder_options=dict(compile=False))
    assert hooked.fast_decoder is not None
    assert run(hooked) == expected
    assert [len(o) for o in expected] == [6, 7, 8, 9, 10, 11]
    log = list(hooked.iteration_log)
    mixed = [s for s in log if s.num_context and s.num_generation]
    assert hooked.fast_steps >= sum(1 for s in log if s.num_generation) and hooked.fast_steps >= 10
    assert mixed and hooked.plain_steps == len(log) - hooked.fast_steps  # mixed steps took the hook too
    assert hooked.cache.num_free_blocks == hooked.cache.num_blocks


@pytest.mark.slow
def test_compiled_regions_match_plain_path():
    model = tiny(TINY_MIXTRAL)
    lens = [5, 12, 2]
    cache, seqs = prefilled(model, lens)
    fast_cache = copy.deepcopy(cache)
    ref = plain_forward(model, cache, [SeqSpan(s, p, 1) for s, p in zip(seqs, lens, strict=True)], [4, 5, 6])
    dec = FastDecoder(model, fast_cache, max_batch_size=4, max_seq_len=64, compile=True)
    out = dec.decode(seqs, [4, 5, 6], lens)
    assert dec.status()["compile"] and not dec.status()["fallbacks"]
    assert_close(out, ref, 1e-4)
    assert_close(fast_cache.k, cache.k, 1e-5)
