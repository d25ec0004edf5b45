"""runtime/engine/tensor_contract.py: a response builds only the outputs its request asked for."""

from __future__ import annotations

import numpy as np
import pytest

from enginesmith.runtime.engine import tensor_contract
from enginesmith.runtime.engine.request import Request
from enginesmith.runtime.engine.sampler import SamplingParams
from enginesmith.runtime.engine.tensor_contract import PERF_OUTPUTS, RowSpec, response_arrays

TIMES = ["arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns"]


def _row() -> tuple[RowSpec, Request]:
    spec = RowSpec(batch_index=1, prompt=[1, 2, 3], max_new_tokens=4, sampling=SamplingParams(), streaming=True,
                   exclude_input_in_output=True, return_log_probs=True, return_num_tokens=(True, True),
                   return_perf_metrics=True)
    req = Request(spec.prompt, 4, arrival_ns=100)
    req.tokens += [5, 6]
    req.log_probs += [-0.5, -0.25]
    req.first_scheduled_ns, req.first_token_ns, req.last_token_ns, req.kv_new_blocks = 110, 120, 130, 2
    return spec, req


@pytest.mark.parametrize("names", [["output_ids"], ["output_ids", *TIMES], ["sequence_length", "num_output_tokens",
                                   "cum_log_probs"], [*PERF_OUTPUTS, "output_log_probs", "batch_index"]])
def test_a_response_holds_the_outputs_asked_for_as_the_full_response_has_them(names):
    spec, req = _row()
    full = response_arrays(spec, req, [6], [-0.25])
    got = response_arrays(spec, req, [6], [-0.25], set(names) | {"generation_logits"})  # one the row cannot give
    assert list(got) == [n for n in full if n in names]
    for name, arr in got.items():
        assert arr.dtype == full[name].dtype and np.array_equal(arr, full[name]), name
    assert got.get("last_token_time_ns", [[130]])[0][0] == 130


def test_perf_metrics_are_not_gathered_when_none_is_asked_for(monkeypatch):
    spec, req = _row()

    def unexpected(_req):
        raise AssertionError("perf metrics gathered for a response that does not carry them")

    monkeypatch.setattr(tensor_contract, "perf_metrics", unexpected)
    assert list(response_arrays(spec, req, [6], [-0.25], {"output_ids", "num_output_tokens"})) == [
        "output_ids", "num_output_tokens"]


def test_the_bench_clients_requests_are_sampled_as_one_batch(monkeypatch):
    """What `enginesmith bench` sends (min_tokens = OSL with the tokenizer's end_id, which the ensemble's
    preprocessing also fills in) must not send rows through per-row sampling: on a GPU each such row costs host
    syncs, and at 256 rows they made a served decode step ~50 ms slower than in process."""
    import torch

    from enginesmith.client.params import GenerateParams, build_inputs
    from enginesmith.runtime.engine.sampler import SequenceSampler, sample
    from enginesmith.runtime.engine.tensor_contract import parse_rows

    specs = [parse_rows(build_inputs(GenerateParams(input_ids=[5, 6, 7], max_tokens=8, stream=True, min_tokens=8,
                                                    end_id=2, pad_id=0, return_perf_metrics=True), "tokens", True),
                        decoupled=True, exclude_input_default=True)[0] for _ in range(4)]
    rows = [SequenceSampler(s.sampling, list(s.prompt), len(s.prompt), 16) for s in specs]

    def per_row(self, logits):
        raise AssertionError("a row of the bench's requests took the per-row sampling path")

    monkeypatch.setattr(SequenceSampler, "process", per_row)
    logits = torch.arange(64, dtype=torch.float32).reshape(4, 16).flip(1)  # end_id 2 ranks third
    logits[:, 2] = 100.0  # end_id is the most likely token, but min_tokens bans it
    tokens, log_probs = sample(logits, rows)
    assert tokens == [0, 0, 0, 0] and all(lp < 0 for lp in log_probs)
