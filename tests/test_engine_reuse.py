"""KV-cache reuse in the reference engine: the same outputs with reuse on and off (alone, concurrently,
chunked, under preemption and cancellation), blocks all back afterwards, and the counters that report it."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest

from enginesmith.builders.mapping import Mapping
from enginesmith.runtime.engine.request import FinishReason, Request, TokenUpdate
from enginesmith.runtime.engine.sampler import SamplingParams
from tests.support import convert_tiny
from tests.test_engine import make_engine, run_alone, run_concurrently

TPB = 8  # tokens_per_block of tests/test_engine.py's engine directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return convert_tiny(tmp_path_factory.mktemp("engine-reuse"), "llama", Mapping.create(1, 1), "float32")


def shared_prefix_requests(n=24, seed=0) -> list[tuple[list[int], int, SamplingParams]]:
    """Prompts on two system prompts (2.5 and 3 blocks), some repeated whole; a few sampled with a seed."""
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 300) for _ in range(20)], [rng.randrange(3, 300) for _ in range(24)]]
    out = []
    for i in range(n):
        system = systems[i % 2]
        suffix = [] if i % 5 == 4 else [rng.randrange(3, 300) for _ in range(rng.randint(1, 14))]
        sampling = SamplingParams() if i % 4 else SamplingParams(top_k=8, temperature=0.8, seed=i)
        out.append((system + suffix, rng.randint(1, 16), sampling))
    return out


def _reference(tmp_path, ckpt, specs) -> list[list[int]]:
    engine = make_engine(tmp_path / "off", ckpt)
    assert not engine.cache.enable_reuse
    outs = [run_alone(engine, Request(p, n, s)).output for p, n, s in specs]
    assert engine.cache.reused_blocks == 0 and engine.cache.num_cached_blocks == 0
    return outs


def test_one_at_a_time_outputs_match_reuse_off_and_skip_the_cached_prefix(tmp_path, ckpt):
    specs = shared_prefix_requests()
    want = _reference(tmp_path, ckpt, specs)
    engine = make_engine(tmp_path / "on", ckpt, enable_kv_cache_reuse=True)
    reqs = [run_alone(engine, Request(p, n, s)) for p, n, s in specs]
    assert [r.output for r in reqs] == want
    # After the first request of each system prompt, every later one finds its full blocks cached.
    for i, (r, (prompt, _, _)) in enumerate(zip(reqs, specs, strict=True)):
        system = 20 + 4 * (i % 2)
        assert r.kv_reused_blocks >= (min(len(prompt) - 1, system) // TPB if i >= 2 else 0), i
    context_tokens = sum(s.num_context_tokens for s in engine.iteration_log)
    assert context_tokens == sum(len(p) for p, _, _ in specs) - TPB * sum(r.kv_reused_blocks for r in reqs)
    assert engine.cache.reused_blocks == sum(r.kv_reused_blocks for r in reqs) > 0
    assert engine.cache.num_used_blocks == 0 and engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize("limits,overrides", [
    ({}, {}),
    ({"max_num_tokens": 24, "max_input_len": 40}, {"enable_chunked_context": True}),
    ({}, {"batch_scheduler_policy": "max_utilization", "max_tokens_in_paged_kv_cache": 96}),
], ids=["default", "chunked_context", "max_utilization_small_cache"])
def test_concurrent_outputs_match_reuse_off(tmp_path, ckpt, limits, overrides):
    specs = shared_prefix_requests(32, seed=1)
    want = _reference(tmp_path, ckpt, specs)
    engine = make_engine(tmp_path / "on", ckpt, limits, enable_kv_cache_reuse=True, **overrides)
    together = run_concurrently(engine, specs)
    assert [r.output for r in together] == want
    assert all(r.finish_reason is FinishReason.LENGTH for r in together)
    iters = list(engine.iteration_log)
    assert max(s.batch_size for s in iters) > 1 and iters[-1].kv_reused_blocks > 0
    if "max_utilization" in str(overrides):
        assert sum(s.paused for s in iters) > 0  # the small cache really forced evictions + recompute
    assert engine.cache.num_used_blocks == 0 and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_a_cancelled_request_leaves_a_correct_prefix_behind(tmp_path, ckpt):
    prompt = list(range(3, 40))
    want = _reference(tmp_path, ckpt, [(prompt + [5], 12, SamplingParams())])[0]
    engine = make_engine(tmp_path / "on", ckpt, enable_kv_cache_reuse=True, cancellation_check_period_ms=1).start()
    finished, seen = threading.Event(), []

    def on_update(u: TokenUpdate):
        seen.append(u)
        if len(seen) == 3:
            engine.cancel("victim")
        if u.finished:
            finished.set()

    try:
        engine.submit(Request(prompt, 80, request_id="victim", on_update=on_update))
        assert finished.wait(60) and seen[-1].request.finish_reason is FinishReason.CANCELLED
        assert engine.cache.num_used_blocks == 0 and engine.cache.num_cached_blocks >= len(prompt) // TPB
        done = threading.Event()
        after = Request(prompt + [5], 12, on_update=lambda u: u.finished and done.set())
        engine.submit(after)
        assert done.wait(60)
    finally:
        engine.shutdown()
    assert after.kv_reused_blocks == len(prompt) // TPB and after.output == want
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


class _Hook:
    """A metrics hook that keeps the reuse totals of every iteration."""

    def __init__(self):
        self.totals: list[tuple[int, int]] = []

    def on_iteration(self, *args, kv_reused_blocks=None, kv_missed_blocks=None, **kw):
        self.totals.append((kv_reused_blocks, kv_missed_blocks))

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_reused_and_missed_blocks_reach_the_metrics_hook(tmp_path, ckpt):
    engine = make_engine(tmp_path, ckpt, enable_kv_cache_reuse=True)
    engine.metrics = hook = _Hook()
    prompt = list(range(3, 28))  # 25 tokens: 4 blocks, 3 of them full
    run_alone(engine, Request(prompt, 2))
    run_alone(engine, Request(prompt[:24] + [7, 8], 2))
    assert hook.totals[-1] == (3, 4 + 1)
    off = make_engine(tmp_path / "off", ckpt)
    off.metrics = hook_off = _Hook()
    run_alone(off, Request(prompt, 2))
    assert hook_off.totals[-1] == (0, 0)


def test_fast_decode_and_graphed_prefill_hooks_read_shared_blocks_like_the_plain_engine(monkeypatch):
    """The CUDA fast paths, on the CPU: decode tokens through FastDecoder (a whole-prompt hit leaves one token,
    which it runs as a decode), prefill chunks of mixed steps through GraphedPrefill, starting mid-sequence."""
    from enginesmith.runtime.engine.engine import Engine
    from enginesmith.runtime.engine.engine_config import EngineConfig
    from enginesmith.runtime.fast.fast_decode import FAST_DECODE_ENV
    from enginesmith.runtime.fast.prefill_graphs import GraphedPrefill
    from enginesmith.runtime.fast.prefill_layers import PrefillLayers
    from tests.test_fast_decode import TPB as FAST_TPB
    from tests.test_fast_decode import tiny

    model = tiny(seed=3)
    gen = random.Random(4)
    system = [gen.randrange(model.cfg.vocab_size) for _ in range(13)]
    prompts = [system + [gen.randrange(model.cfg.vocab_size) for _ in range(n)] for n in (0, 5, 0, 2, 9, 1)]

    def run(engine):
        reqs = [Request(p, 5 + i % 3) for i, p in enumerate(prompts)]
        engine.submit(reqs[0])
        engine.run_until_idle()  # the system prompt is cached before the others arrive
        for r in reqs[1:]:
            engine.submit(r)
        engine.run_until_idle()
        return reqs

    config = EngineConfig(max_batch_size=4, max_input_len=24, max_seq_len=48, max_num_tokens=40,
                          tokens_per_block=FAST_TPB)
    expected = [r.output for r in run(Engine(model, config))]
    monkeypatch.setenv(FAST_DECODE_ENV, "on")  # the engine's own fast path, eager on CPU
    hooked = Engine(model, dataclasses.replace(config, enable_kv_cache_reuse=True),
                    decoder_options=dict(compile=False))
    hooked.fast_decoder.prefill = GraphedPrefill(PrefillLayers(compile=False), buckets=(8, 16, 32))
    reqs = run(hooked)
    assert [r.output for r in reqs] == expected
    assert [r.kv_reused_blocks for r in reqs] == [0, 3, 3, 3, 3, 3]
    assert hooked.fast_steps >= 10 and hooked.fast_decoder.prefill.status()["graph_buckets"]
    assert hooked.cache.num_used_blocks == 0


def test_ranks_read_the_shared_blocks_of_the_drivers_tables(tmp_path, ckpt):
    """tp=2 over gloo: the driver sends block tables with shared blocks; each rank's cache holds their K/V."""
    from enginesmith.runtime.engine.engine import Engine
    from tests.test_engine import write_engine_dir

    specs = [(p, n, SamplingParams()) for p, n, _ in shared_prefix_requests(8, seed=2)]
    want = _reference(tmp_path, ckpt, specs)
    tp2 = convert_tiny(tmp_path / "tp2", "llama", Mapping.create(tp_size=2), "float32")
    engine = Engine.from_engine_dir(write_engine_dir(tmp_path / "tp2" / "engine", tp2), device="cpu",
                                    enable_kv_cache_reuse=True)
    try:
        assert engine.workers is not None
        reqs = [run_alone(engine, Request(p, n, s)) for p, n, s in specs]
    finally:
        engine.shutdown()
    assert [r.output for r in reqs] == want and sum(r.kv_reused_blocks for r in reqs) > 0
