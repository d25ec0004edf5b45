"""The served engine's fast path across ranks (gloo on CPU, ENGINESMITH_FAST_DECODE=on: FastDecoder eager).

Rank 0's engine plans each step; every rank of a single-stage layout runs it through its own FastDecoder (the
decode tokens through the static-buffer step, prefill chunks of the same step through the prefill layers), so the
tp=2 and moe_ep=2 engines must give tp=1's greedy tokens while taking the fast path for their decode steps.
"""

from __future__ import annotations

import pytest

from enginesmith.builders.mapping import Mapping
from enginesmith.runtime.engine.engine import Engine
from enginesmith.runtime.fast.fast_decode import FAST_DECODE_ENV, fast_path_enabled
from tests.test_parallel_serving import BASELINE, LAYOUTS, _engine_dir, _generate_batched

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-ranks")
    return {name: _engine_dir(root, name) for name in ("llama_tp1", "llama_tp2", "mixtral_tp1", "mixtral_ep2")}


@pytest.mark.parametrize("name", ["llama_tp2", "mixtral_ep2"])
def test_fast_path_across_ranks_equals_single_rank(dirs, name, monkeypatch):
    base = Engine.from_engine_dir(dirs[BASELINE[LAYOUTS[name][0]]], device="cpu")  # the plain path, one rank
    assert base.fast_decoder is None
    expected = _generate_batched(base)
    base.shutdown()
    monkeypatch.setenv(FAST_DECODE_ENV, "on")
    engine = Engine.from_engine_dir(dirs[name], device="cpu")
    try:
        assert engine.workers is not None and engine.fast_decoder is not None
        assert len(engine.workers.procs) == Mapping.create(*LAYOUTS[name][1:3],
                                                           moe_ep_size=LAYOUTS[name][3]).world_size - 1
        assert _generate_batched(engine) == expected
        assert engine.fast_steps > 0, "no decode step took the fast path"
        assert engine.plain_steps >= 1  # the first step is all prefill
        mixed = [s for s in engine.iteration_log if s.num_generation and s.num_context]
        assert max(s.batch_size for s in engine.iteration_log) > 1 and engine.workers.alive, mixed
    finally:
        engine.shutdown()
    assert all(not p.is_alive() for p in engine.workers.procs.values())


def test_fast_path_with_pipeline_stages_stays_on_the_stage_path(tmp_path, monkeypatch):
    """pp > 1: FastDecoder runs single-stage ranks only; the engine keeps the micro-batched stage path."""
    monkeypatch.setenv(FAST_DECODE_ENV, "on")
    engine = Engine.from_engine_dir(_engine_dir(tmp_path, "llama_pp2"), device="cpu")
    try:
        assert engine.fast_decoder is None
        assert len(_generate_batched(engine)) == 4 and engine.fast_steps == 0
    finally:
        engine.shutdown()


def test_fast_decode_switch(monkeypatch):
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for value, want in (("1", (False, True)), ("on", (True, True)), ("0", (False, False))):
        monkeypatch.setenv(FAST_DECODE_ENV, value)
        assert (fast_path_enabled(cpu), fast_path_enabled(cuda)) == want
    monkeypatch.setenv(FAST_DECODE_ENV, "yes")
    with pytest.raises(ValueError, match="ENGINESMITH_FAST_DECODE='yes'"):
        fast_path_enabled(cpu)
