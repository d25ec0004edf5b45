"""Sampling: greedy, temperature, top-k/top-p, seeds, penalties, min_tokens, end_id, stop and bad words."""

from __future__ import annotations

import math

import pytest
import torch

from enginesmith.runtime.engine.sampler import (NO_TOKEN, SamplingError, SamplingParams, SequenceSampler,
                                                ends_with_stop_word, sample)

V = 10


def _row(params: SamplingParams, tokens=(1, 2), prompt_len=None) -> SequenceSampler:
    tokens = list(tokens)
    return SequenceSampler(params, tokens, len(tokens) if prompt_len is None else prompt_len, V)


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 300) -> list[int]:
    r = _row(params)
    return [sample(logits[None], [r])[0][0] for _ in range(n)]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(top_k=1, temperature=0.7),
                                    SamplingParams(temperature=0.0, top_k=5, top_p=0.9)])
def test_greedy_variants_pick_the_argmax_and_report_its_log_prob(params):
    assert params.is_greedy
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    tokens, logp = sample(logits, [_row(params) for _ in range(4)])
    assert tokens == logits.argmax(-1).tolist()
    want = torch.log_softmax(logits / (params.temperature or 1), -1)
    assert logp == pytest.approx(want.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist(), abs=1e-5)


def test_seed_makes_sampling_reproducible_and_independent_of_the_batch():
    flat = torch.zeros(V)
    p = SamplingParams(top_k=0, top_p=1.0, seed=7)
    assert _draws(p, flat, 50) == _draws(p, flat, 50)
    assert _draws(p, flat, 50) != _draws(SamplingParams(top_p=1.0, seed=8), flat, 50)
    alone = _draws(p, flat, 20)
    a, b = _row(p), _row(SamplingParams(top_p=1.0, seed=99))
    together = [sample(torch.stack([flat, flat]), [b, a])[0][1] for _ in range(20)]
    assert together == alone


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([0.0, 3.0, 2.9, 0.1, 2.8, 0.0, 0.0, 0.0, 0.0, 0.0])
    seen = set(_draws(SamplingParams(top_k=3, seed=1), logits))
    assert seen == {1, 2, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * 6)
    logits = torch.log(probs.clamp_min(1e-12))
    assert set(_draws(SamplingParams(top_p=0.7, seed=3), logits)) == {0, 1}
    assert set(_draws(SamplingParams(top_p=0.5, seed=3), logits)) == {0}
    assert set(_draws(SamplingParams(top_k=3, top_p=0.95, seed=3), logits)) == {0, 1, 2}


def test_temperature_scales_logits_before_the_penalties():
    logits = torch.tensor([2.0, -2.0] + [0.5] * (V - 2))
    r = _row(SamplingParams(temperature=2.0, repetition_penalty=2.0), tokens=[0, 1])
    x = r.process(logits)
    assert x[0].item() == pytest.approx(2.0 / 2 / 2)  # (2 / T) / rp
    assert x[1].item() == pytest.approx(-2.0 / 2 * 2)  # (-2 / T) * rp
    assert x[2].item() == pytest.approx(0.25)  # unseen: only temperature


def test_presence_and_frequency_count_prompt_and_output_tokens():
    logits = torch.zeros(V)
    r = _row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), tokens=[3, 3, 4], prompt_len=2)
    x = r.process(logits)
    assert x[3].item() == pytest.approx(-0.5 - 2 * 0.25)
    assert x[4].item() == pytest.approx(-0.5 - 0.25)
    assert x[5].item() == 0.0
    r.tokens.append(5)  # counts follow the growing sequence
    assert r.process(logits)[5].item() == pytest.approx(-0.75)


def test_min_tokens_bans_end_id_until_enough_tokens_were_generated():
    logits = torch.zeros(V)
    logits[2] = 10.0
    r = _row(SamplingParams(end_id=2, min_tokens=2), tokens=[1], prompt_len=1)
    assert sample(logits[None], [r])[0] == [0]  # argmax among the rest: first of the ties
    r.tokens.extend([0, 0])
    assert sample(logits[None], [r])[0] == [2]


def test_an_end_id_outside_the_vocabulary_is_accepted_and_never_banned():
    """TensorRT-LLM takes an end_id >= vocab_size (load tools send one to mean "never stop at EOS")."""
    p = SamplingParams(end_id=V + 7, min_tokens=3)
    p.validate(V)
    logits = torch.arange(V, dtype=torch.float32)
    assert sample(logits[None], [_row(p, tokens=[1], prompt_len=1)])[0] == [V - 1]


def test_bad_words_ban_the_token_that_would_complete_them():
    logits = torch.arange(V, dtype=torch.float32)  # 9 is the argmax, then 8, ...
    p = SamplingParams(bad_words=((9,), (5, 8)))
    assert sample(logits[None], [_row(p, tokens=[1, 2])])[0] == [8]  # (5, 8) not started: 8 allowed
    assert sample(logits[None], [_row(p, tokens=[1, 5])])[0] == [7]  # after 5, 8 is banned too


def test_a_row_with_every_token_banned_fails_alone():
    banned = SamplingParams(bad_words=tuple((t,) for t in range(V)))
    tokens, logp = sample(torch.zeros(2, V), [_row(banned), _row(SamplingParams(top_p=1.0))])
    assert tokens[0] == NO_TOKEN and logp[0] == float("-inf") and 0 <= tokens[1] < V


def test_stop_words_match_the_end_of_the_sequence():
    assert ends_with_stop_word([1, 2, 3], ((2, 3),))
    assert ends_with_stop_word([1, 2, 3], ((9,), (3,)))
    assert not ends_with_stop_word([1, 2, 3], ((1, 2),))
    assert not ends_with_stop_word([3], ((2, 3),))


@pytest.mark.parametrize("params,field", [
    (SamplingParams(temperature=-1), "temperature=-1"), (SamplingParams(top_k=-2), "runtime_top_k=-2"),
    (SamplingParams(top_p=1.5), "runtime_top_p=1.5"), (SamplingParams(repetition_penalty=0), "repetition_penalty=0"),
    (SamplingParams(min_tokens=-1), "min_tokens=-1"), (SamplingParams(end_id=-2), "end_id=-2"),
    (SamplingParams(stop_words=((1, V + 3),)), "stop_words_list"), (SamplingParams(bad_words=((),)), "bad_words_list"),
])
def test_validation_names_the_field(params, field):
    with pytest.raises(SamplingError, match=field.replace("[", r"\[")):
        params.validate(V)


def test_sampled_log_prob_is_that_of_the_processed_distribution():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(5))
    r = _row(SamplingParams(temperature=0.5, top_k=4, seed=2))
    (tok,), (lp,) = sample(logits[None], [r])
    assert lp == pytest.approx(torch.log_softmax(logits / 0.5, -1)[tok].item(), abs=1e-5)
    assert lp < 0 and not math.isnan(lp)


def test_a_mixed_batch_gives_each_row_what_it_gets_alone():
    """Greedy rows (min_tokens bans included) run as one batch, the others row by row: same tokens, same log-probs."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, V, generator=g)
    logits[:, 3] += 5.0  # end_id 3 is every row's argmax
    params = [SamplingParams(end_id=3, min_tokens=4), SamplingParams(temperature=0.5, top_k=3, seed=1),
              SamplingParams(end_id=3, min_tokens=1), SamplingParams(temperature=0.7, top_k=1, end_id=3, min_tokens=9),
              SamplingParams(bad_words=((3,),)), SamplingParams(repetition_penalty=1.3)]
    rows = [_row(p, tokens=[1, 2], prompt_len=1) for p in params]  # one token generated so far
    tokens, logp = sample(logits, rows)
    alone = [sample(logits[i][None], [_row(p, tokens=[1, 2], prompt_len=1)]) for i, p in enumerate(params)]
    assert tokens == [t[0][0] for t in alone]
    assert logp == pytest.approx([t[1][0] for t in alone], abs=1e-5)
    assert tokens[0] != 3 and tokens[2] == 3 and tokens[3] != 3 and tokens[4] != 3


def test_a_one_token_vocabulary_with_its_end_id_banned_has_nothing_to_sample():
    r = SequenceSampler(SamplingParams(end_id=0, min_tokens=2), [5], 1, 1)
    assert sample(torch.zeros(1, 1), [r]) == ([NO_TOKEN], [float("-inf")])
