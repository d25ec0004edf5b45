"""Prefill without a cache: batched causal attention over packed prompts, and the compiled layer runner."""

from __future__ import annotations

import math

import pytest
import torch

from enginesmith.runtime.model.attention import DenseCausalAttention
from enginesmith.runtime.parallel.pipeline import MicroBatch, run_layers
from enginesmith.runtime.fast.prefill_layers import PrefillLayers
from enginesmith.runtime.model.random_model import TINY_LLAMA, TINY_MIXTRAL
from tests.test_fast_decode import assert_close, tiny


def _explicit_attention(q, k, v, lens):
    """Softmax(q k^T / sqrt(d)) v per sequence with a causal mask, KV heads shared by q-head groups."""
    out, start, groups = [], 0, q.shape[1] // k.shape[1]
    for n in lens:
        for t in range(n):
            rows = []
            for h in range(q.shape[1]):
                keys, values = k[start:start + t + 1, h // groups], v[start:start + t + 1, h // groups]
                p = torch.softmax(keys @ q[start + t, h] / math.sqrt(q.shape[2]), dim=0)
                rows.append(p @ values)
            out.append(torch.stack(rows))
        start += n
    return torch.stack(out)


def test_dense_causal_attention_batches_equal_lengths_and_matches_explicit_softmax():
    torch.manual_seed(0)
    lens = [3, 3, 5, 2, 2, 2, 3]  # runs of equal lengths, split by others: 5 SDPA calls
    nq, nkv, d = 4, 2, 8
    q, k, v = torch.randn(sum(lens), nq, d), torch.randn(sum(lens), nkv, d), torch.randn(sum(lens), nkv, d)
    attn = DenseCausalAttention(lens)
    assert attn.runs == [(0, 3, 2), (6, 5, 1), (11, 2, 3), (17, 3, 1)]
    assert_close(attn(0, q, k, v), _explicit_attention(q, k, v, lens), 1e-5)
    with pytest.raises(ValueError, match="cover 20 tokens but attention got 19"):
        attn(0, q[:-1], k[:-1], v[:-1])


def _micro_batch(model, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (sum(lens),), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lens])
    last = torch.cumsum(torch.tensor(lens), 0) - 1
    return MicroBatch(ids, positions, last, DenseCausalAttention(lens))


@pytest.mark.parametrize("shape", [TINY_LLAMA, TINY_MIXTRAL], ids=["dense", "moe"])
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_prefill_layers_match_run_layers(shape, compile):
    model = tiny(shape)
    mb = _micro_batch(model, [7, 7, 3, 12])
    hidden = model.embed(mb.input_ids)
    calls = []

    def reduce(x):  # stands in for the TP all-reduce: both runners must call it at the same points
        calls.append(x.shape)
        return x * 1.0

    with torch.inference_mode():
        ref_calls = []
        ref = run_layers(model, lambda x: ref_calls.append(x.shape) or x, hidden, mb)
        runner = PrefillLayers(compile=compile)
        got = runner(model, reduce, hidden, mb)
    assert not runner.fallback and runner.checked == compile
    assert calls == ref_calls and len(calls) == 2 * model.num_local_layers
    assert_close(got, ref, 1e-4 if compile else 1e-5)


def test_a_compiled_region_that_disagrees_is_dropped_for_the_eager_layers(caplog):
    model = tiny()
    mb = _micro_batch(model, [5, 9])
    hidden = model.embed(mb.input_ids)
    runner = PrefillLayers(compile=False)
    runner.compiled = True  # as if compiled, with a broken region: the check must catch it before a step
    runner.mlp = lambda h, a, *rest: (h + a, torch.zeros_like(h))
    with torch.inference_mode():
        got = runner(model, None, hidden, mb)
        ref = run_layers(model, None, hidden, mb)
    assert "differ from eager ones" in runner.fallback and "differ from eager ones" in caplog.text
    assert torch.equal(got, ref)


def test_a_region_that_fails_to_compile_is_dropped_for_the_eager_layers():
    model = tiny()
    runner = PrefillLayers(compile=False)
    runner.compiled = True

    def broken(*args):
        raise RuntimeError("no C compiler")

    runner.pre = broken
    assert not runner.check(model)
    assert runner.fallback == "torch.compile failed, prefill runs eager: RuntimeError: no C compiler"
