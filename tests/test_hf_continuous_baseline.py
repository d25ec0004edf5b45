"""benchmarks.runtime_hf.continuous_batching (transformers' ContinuousBatchingManager) on a tiny CPU model."""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks import runtime_hf
from enginesmith.runtime.model.random_model import TINY_LLAMA, checkpoint_config, random_rank_model


@pytest.fixture(scope="module")
def hf():
    return runtime_hf.hf_llama_sharing(random_rank_model(checkpoint_config(TINY_LLAMA), seed=0))


@pytest.fixture(scope="module")
def workload(hf):
    rng = random.Random(0)
    prompts = [[rng.randrange(1, hf.config.vocab_size) for _ in range(rng.randint(4, 24))] for _ in range(12)]
    return prompts, [rng.randint(2, 10) for _ in range(12)]


def greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("cb_options", [dict(num_blocks=64, max_batch_tokens=128), None],
                         ids=["tiny_options", "default_sizing"])
def test_every_request_finishes_with_its_osl_and_greedy_tokens(hf, workload, cb_options):
    prompts, osls = workload
    r = runtime_hf.continuous_batching(hf, prompts, osls, 60.0, lambda _: None, cb_options, keep_tokens=True)
    assert "error" not in r, r
    assert r["complete"] and r["requests_finished"] == len(prompts)
    assert r["tokens_per_request"] == osls and [len(t) for t in r["tokens"]] == osls and r["wrong_length"] == 0
    assert r["output_tokens"] == sum(osls) and r["unfinished_tokens"] == 0 and r["tok_s"] > 0
    assert r["api"] == "ContinuousBatchingManager" and r["transformers"]
    if cb_options is None:
        assert r["cb_options"]["max_requests_per_batch"] == len(prompts) and r["cb_options"]["num_blocks"] > 0
    for i in (0, 5, 10):  # osls 5, 2, 10
        assert r["tokens"][i] == greedy(hf, prompts[i], osls[i]), i
    assert hf.config._attn_implementation == "sdpa"  # the manager gave the shared model back


def test_spent_budget_hard_stops_and_counts_partial_tokens(hf, workload):
    prompts, osls = workload
    r = runtime_hf.continuous_batching(hf, prompts * 4, [300] * 48, 0.3, lambda _: None,
                                       dict(num_blocks=64, max_batch_tokens=32))
    assert "error" not in r, r
    assert not r["complete"] and r["requests_finished"] < 48 and r["wrong_length"] == 0
    assert r["output_tokens"] == 300 * r["requests_finished"]
    assert r["output_tokens"] + r["unfinished_tokens"] == sum(r["tokens_per_request"]) < 48 * 300  # cut short
    assert hf.config._attn_implementation == "sdpa"


def test_bad_option_is_reported_not_raised(hf, workload):
    prompts, osls = workload
    r = runtime_hf.continuous_batching(hf, prompts[:2], osls[:2], 10.0, lambda _: None, dict(num_blockz=8))
    assert "num_blockz" in r["error"] and "requests_finished" not in r


def test_block_size_and_page_size_both_accepted(hf, workload):
    prompts, osls = workload
    for name in ("block_size", "page_size"):
        r = runtime_hf.continuous_batching(hf, prompts[:3], osls[:3], 30.0, lambda _: None,
                                           {name: 32, "num_blocks": 16, "max_batch_tokens": 64})
        assert "error" not in r and r["complete"] and r["tokens_per_request"] == osls[:3], (name, r)
