"""The reference engine in-process: transformers parity, batching invariance, cancellation, failures."""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch

from enginesmith.builders.mapping import Mapping
from enginesmith.runtime.engine.engine import Engine
from enginesmith.runtime.engine.engine_config import EngineConfigError
from enginesmith.runtime.engine.request import FinishReason, Request, RequestError, TokenUpdate
from enginesmith.runtime.engine.sampler import SamplingParams
from tests.support import convert_tiny, tiny_hf_model

PROMPTS = ["Hello world!", "The quick brown fox jumps", "Triton", "Once upon a time there was a little robot",
           "Numbers: 0 1 2 3", "café"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return convert_tiny(tmp_path_factory.mktemp("engine"), "llama", Mapping.create(1, 1), "float32")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_model("llama"))


def write_engine_dir(path, ckpt, **limits):
    cfg = dict(target="reference", checkpoint_dir=str(ckpt), max_batch_size=16, max_input_len=64, max_seq_len=128,
               max_num_tokens=256, max_beam_width=1, tokens_per_block=8, dtype="float32") | limits
    path.mkdir(parents=True, exist_ok=True)
    (path / "engine_config.json").write_text(json.dumps(cfg))
    return path


def make_engine(tmp_path, ckpt, limits=None, **overrides) -> Engine:
    return Engine.from_engine_dir(write_engine_dir(tmp_path / "engine", ckpt, **(limits or {})), **overrides)


def run_alone(engine: Engine, req: Request) -> Request:
    engine.submit(req)
    engine.run_until_idle()
    return req


def test_greedy_matches_transformers_generate(tmp_path, ckpt, tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_model("llama"), dtype=torch.float32)
    engine = make_engine(tmp_path, ckpt)
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        req = run_alone(engine, Request(ids, 16, SamplingParams(end_id=tokenizer.eos_token_id)))
        want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        if want[-1] == tokenizer.eos_token_id:  # TensorRT-LLM leaves end_id out of the output
            want = want[:-1]
        assert req.output == want, text
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_bfloat16_engine_follows_the_bfloat16_oracle(tmp_path, ckpt):
    """bf16 weights, activations and KV cache: the first token of each prompt is the dense oracle's argmax."""
    from enginesmith.runtime.model.emulate import emulate_logits

    engine = make_engine(tmp_path, ckpt, {"dtype": "bfloat16"})
    assert engine.cache.k.dtype == torch.bfloat16
    prompts = [[5, 6, 7, 8], [40, 41], list(range(100, 130))]
    for prompt in prompts:
        req = run_alone(engine, Request(prompt, 6))
        assert len(req.output) == 6
        assert req.output[0] == int(emulate_logits(ckpt, torch.tensor(prompt), dtype=torch.bfloat16)[-1].argmax())


def mixed_requests(n=32, seed=0) -> list[tuple[list[int], int, SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 40))]
        sampling = SamplingParams() if i % 3 else SamplingParams(top_k=8, top_p=0.9, temperature=0.8, seed=i,
                                                                   repetition_penalty=1.1)
        out.append((prompt, rng.randint(1, 20), sampling))
    return out


def run_concurrently(engine: Engine, specs) -> list[Request]:
    """Submit everything to the engine thread at once; wait for every final update."""
    done = threading.Semaphore(0)
    reqs = [Request(p, n, s, request_id=str(i), on_update=lambda u: u.finished and done.release())
            for i, (p, n, s) in enumerate(specs)]
    engine.start()
    try:
        for r in reqs:
            engine.submit(r)
        for _ in reqs:
            assert done.acquire(timeout=120), "a request never finished"
    finally:
        engine.shutdown()
    return reqs


@pytest.mark.parametrize("limits,overrides", [
    ({}, {}),
    ({"max_num_tokens": 24, "max_input_len": 40}, {"enable_chunked_context": True}),
    ({}, {"batch_scheduler_policy": "max_utilization", "max_tokens_in_paged_kv_cache": 160}),
], ids=["default", "chunked_context", "max_utilization_small_cache"])
def test_concurrent_requests_equal_one_at_a_time(tmp_path, ckpt, limits, overrides):
    specs = mixed_requests()
    alone_engine = make_engine(tmp_path / "a", ckpt)
    alone = [run_alone(alone_engine, Request(p, n, s)).output for p, n, s in specs]
    engine = make_engine(tmp_path / "b", ckpt, limits, **overrides)
    together = run_concurrently(engine, specs)
    assert [r.output for r in together] == alone
    assert [len(r.output) for r in together] == [n for _, n, _ in specs]
    assert all(r.finish_reason is FinishReason.LENGTH for r in together)
    iters = list(engine.iteration_log)
    assert max(s.batch_size for s in iters) > 1
    assert any(s.num_context and s.num_generation for s in iters)  # prefill mixed with decodes
    assert all(s.num_tokens <= engine.config.max_num_tokens for s in iters)
    if "max_utilization" in str(overrides):
        assert sum(s.paused for s in iters) > 0  # the small cache really forced evictions + recompute
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_streaming_updates_and_timings(tmp_path, ckpt):
    engine = make_engine(tmp_path, ckpt, iteration_log_path=str(tmp_path / "iters.jsonl"))
    updates: list[TokenUpdate] = []
    req = run_alone(engine, Request([5, 6, 7], 6, on_update=updates.append))
    assert [len(u.new_tokens) for u in updates] == [1] * 6 and [u.finished for u in updates] == [False] * 5 + [True]
    assert [t for u in updates for t in u.new_tokens] == req.output
    assert req.arrival_ns <= req.first_scheduled_ns <= req.first_token_ns <= req.last_token_ns
    logged = [json.loads(line) for line in (tmp_path / "iters.jsonl").read_text().splitlines()]
    assert [x["batch_size"] for x in logged] == [1] * 6 and logged[-1]["released"] == 1


def test_end_id_and_stop_words_end_a_request(tmp_path, ckpt):
    engine = make_engine(tmp_path, ckpt)
    ref = run_alone(engine, Request([10, 20, 30], 10)).output
    i = next(i for i in range(1, 10) if ref[i] not in ref[:i])
    ended = run_alone(engine, Request([10, 20, 30], 10, SamplingParams(end_id=ref[i])))
    assert ended.output == ref[:i] and ended.finish_reason is FinishReason.END_ID
    stopped = run_alone(engine, Request([10, 20, 30], 10, SamplingParams(stop_words=(tuple(ref[i - 1: i + 1]),))))
    assert stopped.output == ref[: i + 1] and stopped.finish_reason is FinishReason.STOP_WORDS
    never = run_alone(engine, Request([10, 20, 30], 10, SamplingParams(end_id=engine.vocab_size + 100)))
    assert never.output == ref and never.finish_reason is FinishReason.LENGTH  # out of vocabulary: no end


@pytest.mark.parametrize("how", ["stop_request", "is_cancelled"])
def test_cancelled_stream_frees_its_blocks(tmp_path, ckpt, how):
    engine = make_engine(tmp_path, ckpt, cancellation_check_period_ms=1).start()
    start_free = engine.cache.num_free_blocks
    cancelled, finished, seen = threading.Event(), threading.Event(), []

    def on_update(u: TokenUpdate):
        seen.append(u)
        if len(seen) == 3:
            engine.cancel("victim") if how == "stop_request" else cancelled.set()
        if u.finished:
            finished.set()

    req = Request(list(range(3, 40)), 80, request_id="victim", on_update=on_update, is_cancelled=cancelled.is_set)
    try:
        engine.submit(req)
        assert finished.wait(60)
        assert req.finish_reason is FinishReason.CANCELLED and 3 <= len(req.output) < 80
        assert engine.cache.num_free_blocks == start_free == engine.cache.num_blocks
        after = run_concurrently_one(engine, [1, 2, 3])
        assert len(after.output) == 4  # the engine keeps serving
    finally:
        engine.shutdown()


def run_concurrently_one(engine: Engine, prompt: list[int]) -> Request:
    done = threading.Event()
    req = Request(prompt, 4, on_update=lambda u: u.finished and done.set())
    engine.submit(req)
    assert done.wait(60)
    return req


def test_a_failing_iteration_fails_its_requests_frees_blocks_and_keeps_serving(tmp_path, ckpt):
    engine = make_engine(tmp_path, ckpt)
    real = engine.model.mlp_partial
    engine.model.mlp_partial = lambda i, h: (_ for _ in ()).throw(RuntimeError("device fell over"))
    bad = run_alone(engine, Request([1, 2, 3], 5))
    assert bad.finish_reason is FinishReason.FAILED and "device fell over" in bad.error
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    engine.model.mlp_partial = real
    assert len(run_alone(engine, Request([1, 2, 3], 5)).output) == 5


def test_a_request_with_nothing_left_to_sample_fails_alone(tmp_path, ckpt):
    engine = make_engine(tmp_path, ckpt)
    everything = SamplingParams(bad_words=tuple((t,) for t in range(engine.vocab_size)))
    doomed, fine = Request([1, 2, 3], 4, everything), Request([4, 5], 4)
    engine.submit(doomed)
    engine.submit(fine)
    engine.run_until_idle()
    assert engine.iteration_log.recent[0].batch_size == 2  # they shared the iteration
    assert doomed.finish_reason is FinishReason.FAILED and "every token is banned" in doomed.error
    assert fine.finish_reason is FinishReason.LENGTH and len(fine.output) == 4
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize("req,message", [
    (Request([], 4), "input_ids is empty"),
    (Request([1, 2], 0), r"request_output_len=0 is outside \[1, 2147483647\]"),
    (Request([1] * 65, 4), "65 tokens, more than max_input_len=64"),
    (Request([1] * 60, 69), "exceed max_seq_len=128: ask for at most 68"),
    (Request([1, 999], 4), "token id 999, outside the vocabulary"),
    (Request([1, 2], 4, SamplingParams(top_p=2.0)), "runtime_top_p=2.0"),
])
def test_bad_requests_get_clear_errors(tmp_path, ckpt, req, message):
    engine = make_engine(tmp_path, ckpt)
    with pytest.raises(RequestError, match=message):
        engine.submit(req)
    assert len(run_alone(engine, Request([1, 2], 2)).output) == 2


def test_engine_dir_errors_name_the_problem(tmp_path, ckpt):
    with pytest.raises(EngineConfigError, match="engine_config.json is missing"):
        Engine.from_engine_dir(tmp_path)
    with pytest.raises(EngineConfigError, match="batch_scheduler_policy='lifo'"):
        make_engine(tmp_path, ckpt, batch_scheduler_policy="lifo")
    with pytest.raises(EngineConfigError, match="max_beam_width=4"):
        make_engine(tmp_path, ckpt, {"max_beam_width": 4})
