"""Piecewise prefill graphs: bucketed static buffers, per-layer replays, attention on the real rows only.

Off CUDA the graphs are stand-ins that re-run their recorded bodies (runtime/prefill_graphs._Replay), so the
padding, bucket reuse and fallbacks are checked here on the CPU; the real CUDA-graph test runs on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from enginesmith.runtime.fast import prefill_graphs
from enginesmith.runtime.parallel.pipeline import run_layers
from enginesmith.runtime.fast.prefill_graphs import GraphedPrefill, _Bucket, layer_runner
from enginesmith.runtime.fast.prefill_layers import PrefillLayers
from enginesmith.runtime.model.random_model import TINY_MIXTRAL
from tests.test_fast_decode import assert_close, tiny
from tests.test_prefill_layers import _micro_batch


def _step(runner, model, lens, seed=0, reduce=None):
    mb = _micro_batch(model, lens, seed)
    hidden = model.embed(mb.input_ids)
    with torch.inference_mode():
        return runner(model, reduce, hidden, mb), run_layers(model, reduce, hidden, mb)


def test_steps_are_padded_to_buckets_that_are_reused_and_match_the_eager_layers():
    model = tiny()
    runner = GraphedPrefill(PrefillLayers(compile=False), buckets=(8, 16, 32))
    for lens, seed in (([6, 7], 0), ([9], 1), ([3, 2, 4], 2), ([5, 15], 3)):  # 13, 9 -> 16; 9 -> 16; 20 -> 32
        got, want = _step(runner, model, lens, seed)
        assert_close(got, want, 1e-5)
    assert runner.status() == dict(compiled=False, graph_buckets=[16, 32], fallback="") and runner.checked
    got, want = _step(runner, model, [20, 20])  # 40 tokens: past the largest bucket, the regions run it
    assert_close(got, want, 1e-5)
    assert runner.status()["graph_buckets"] == [16, 32]


def test_a_bucket_made_under_inference_mode_serves_no_grad_callers_too():
    """The engine steps under inference_mode, rank_forward under no_grad: one bucket must serve both."""
    model = tiny()
    runner = GraphedPrefill(PrefillLayers(compile=False), buckets=(16,))
    mb = _micro_batch(model, [5, 6])
    with torch.inference_mode():
        first = runner(model, None, model.embed(mb.input_ids), mb)
    with torch.no_grad():
        again = runner(model, None, model.embed(mb.input_ids), mb)
    assert torch.equal(first, again) and runner.status()["graph_buckets"] == [16]


@pytest.mark.parametrize("case", ["tp", "moe"])
def test_tp_steps_and_moe_layers_run_the_regions(case):
    model = tiny(TINY_MIXTRAL) if case == "moe" else tiny()
    runner = GraphedPrefill(PrefillLayers(compile=False), buckets=(16,))
    calls = []
    reduce = (lambda x: calls.append(1) or x) if case == "tp" else None
    got, want = _step(runner, model, [4, 5], reduce=reduce)
    assert_close(got, want, 1e-5)
    assert runner.status()["graph_buckets"] == []
    assert len(calls) == (4 * model.num_local_layers if case == "tp" else 0)  # runner's and run_layers' calls


def test_a_graphed_step_that_disagrees_falls_back_to_the_regions(monkeypatch, caplog):
    model = tiny()
    runner = GraphedPrefill(PrefillLayers(compile=False), buckets=(16,))
    monkeypatch.setattr(_Bucket, "post", lambda self, i: self.h.add_(1.0))  # loses the MLP
    got, want = _step(runner, model, [6, 6])
    assert_close(got, want, 1e-5)
    assert "differs from the compiled regions" in runner.fallback and "prefill graphs" in caplog.text
    assert runner.status()["graph_buckets"] == []


def test_a_capture_error_falls_back_to_the_regions(monkeypatch):
    model = tiny()
    runner = GraphedPrefill(PrefillLayers(compile=False), buckets=(16,))

    def broken(self, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_Bucket, "capture", broken)
    got, want = _step(runner, model, [3, 4])
    assert_close(got, want, 1e-5)
    assert runner.fallback == ("CUDA graph capture failed: RuntimeError: operation not permitted when stream is "
                               "capturing")


def test_layer_runner_by_device_and_switches(monkeypatch):
    monkeypatch.setattr(prefill_graphs, "_runner", None)
    assert layer_runner("cpu") is run_layers
    monkeypatch.setenv("ENGINESMITH_PREFILL_COMPILE", "0")
    assert layer_runner("cuda") is run_layers
    monkeypatch.delenv("ENGINESMITH_PREFILL_COMPILE")
    graphed = layer_runner("cuda")  # compiles lazily: building it needs no GPU
    assert isinstance(graphed, GraphedPrefill) and graphed.regions.compiled and layer_runner("cuda") is graphed
    monkeypatch.setenv("ENGINESMITH_PREFILL_GRAPHS", "0")
    assert layer_runner("cuda") is graphed.regions  # the same compiled regions, without graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_match_the_compiled_regions_on_a_gpu():
    model = tiny(device="cuda")
    regions = PrefillLayers(compile=True)
    runner = GraphedPrefill(regions, buckets=(16, 64, 256))
    assert runner.prepare(model, 64) == [16, 64] and regions.checked and not regions.fallback
    for lens, seed in (([6, 7], 0), ([30, 20], 1), ([11], 2), ([40, 9], 3)):
        mb = _micro_batch(model, lens, seed)
        mb.input_ids, mb.positions = mb.input_ids.cuda(), mb.positions.cuda()
        hidden = model.embed(mb.input_ids)
        with torch.inference_mode():
            got, want = runner(model, None, hidden, mb), regions(model, None, hidden, mb)
        assert_close(got, want, 1e-4)
    assert runner.status() == dict(compiled=True, graph_buckets=[16, 64], fallback="")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_engine_decoder_captures_the_prefill_graphs_at_start_on_a_gpu(monkeypatch):
    from enginesmith.runtime.engine.engine_config import EngineConfig
    from enginesmith.runtime.fast.fast_decode import FastDecoder
    from enginesmith.runtime.engine.kv_cache import PagedKVCache

    monkeypatch.setattr(prefill_graphs, "_runner", None)
    model = tiny(device="cuda")
    cache = PagedKVCache(num_layers=model.num_local_layers, num_kv_heads=model.num_kv_heads,
                         head_size=model.head_size, num_blocks=32, tokens_per_block=8, device="cuda")
    config = EngineConfig(max_batch_size=2, max_input_len=32, max_seq_len=64, max_num_tokens=200, tokens_per_block=8)
    dec = FastDecoder.for_engine(model, cache, config)
    assert dec.status()["prefill"] == dict(compiled=True, graph_buckets=[128, 256], fallback="")
    from torch._dynamo.utils import counters

    compiled_before = counters["stats"]["unique_graphs"]
    mb = _micro_batch(model, [70, 60])  # 130 tokens: the 256 bucket
    mb.input_ids, mb.positions = mb.input_ids.cuda(), mb.positions.cuda()
    with torch.inference_mode():  # as the engine steps: nothing compiles at the first request
        got = dec.prefill(model, None, model.embed(mb.input_ids), mb)
        want = run_layers(model, None, model.embed(mb.input_ids), mb)
    assert_close(got, want, 1e-4)
    assert counters["stats"]["unique_graphs"] == compiled_before and dec.prefill.checked


def test_prefill_benchmark_smoke_on_cpu(tmp_path):
    from benchmarks.kernels.prefill_layers import main

    res = main(["--tiny", "--tokens", "30,8", "--out", str(tmp_path)])
    assert [r["tokens"] for r in res["steps"].values()] == [30, 8]
    for row in res["steps"].values():
        assert row["rel_err_vs_compiled"] == 0.0 and row["rel_err_vs_eager"] < 1e-5
        assert all(row[k]["wall_ms"] >= row[k]["host_ms"] > 0 for k in ("graphed", "compiled", "eager"))
    assert res["status"] == dict(compiled=False, graph_buckets=[128], fallback="")
    assert (tmp_path / "prefill-layers-cpu.json").is_file()


def test_prepare_captures_every_bucket_up_to_the_step_limit_before_any_step():
    model = tiny()
    runner = GraphedPrefill(PrefillLayers(compile=False), buckets=(8, 16, 32, 64))
    assert runner.prepare(model, 20) == [8, 16, 32]  # a 20-token step lands in 32
    assert runner.status()["graph_buckets"] == [8, 16, 32]
    got, want = _step(runner, model, [9, 9])  # 18 tokens: the prepared bucket of 32, nothing new
    assert_close(got, want, 1e-5)
    assert runner.status()["graph_buckets"] == [8, 16, 32]
    assert GraphedPrefill(PrefillLayers(compile=False), buckets=(8, 16)).prepare(model, 100) == [8, 16]
    assert GraphedPrefill(PrefillLayers(compile=False)).prepare(tiny(TINY_MIXTRAL), 100) == []  # MoE: no graphs


@pytest.mark.slow
def test_prepare_compiles_everything_the_first_step_needs():
    """Steps pass inference tensors, the graphs' buffers are normal ones: Dynamo compiles each kind apart, so
    prepare must compile both or the first request pays for compiling (3 graphs without it)."""
    from torch._dynamo.utils import counters

    model = tiny()
    runner = GraphedPrefill(PrefillLayers(compile=True), buckets=(128, 256))
    assert runner.prepare(model, 200) == [128, 256]
    before = counters["stats"]["unique_graphs"]
    mb = _micro_batch(model, [70, 60])
    with torch.inference_mode():
        got = runner(model, None, model.embed(mb.input_ids), mb)
        want = run_layers(model, None, model.embed(mb.input_ids), mb)
    assert_close(got, want, 1e-4)
    assert counters["stats"]["unique_graphs"] == before and runner.checked and not runner.fallback


def test_prepare_that_fails_to_capture_leaves_no_graphs(monkeypatch):
    model = tiny()
    runner = GraphedPrefill(PrefillLayers(compile=False), buckets=(8, 16))
    real = _Bucket.capture

    def second_fails(self, pool):
        if self.size == 16:
            raise RuntimeError("out of memory")
        return real(self, pool)

    monkeypatch.setattr(_Bucket, "capture", second_fails)
    assert runner.prepare(model, 16) == []
    assert runner.status() == dict(compiled=False, graph_buckets=[], fallback="CUDA graph capture failed: "
                                   "RuntimeError: out of memory")
    got, want = _step(runner, model, [3, 4])
    assert_close(got, want, 1e-5)
