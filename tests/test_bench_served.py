"""A short benchmark of the real served tiny model: exact counts and token totals, server timings, Triton
statistics, the JSON files (vLLM field names) and plots, and the `enginesmith bench` command."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from typer.testing import CliRunner

from enginesmith.builders.cli import app
from enginesmith.client.bench import BenchConfig, LoadPoint, run_bench
from enginesmith.client.bench_report import load_runs, write_results
from enginesmith.client.dataset import random_prompts

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]
ISL, OSL, N = 12, 6, 5


@pytest.fixture(scope="module")
def runs(served, tok):
    prompts = random_prompts(tok, 2 * N + 1, ISL, OSL, seed=1)
    cfg = BenchConfig(served.grpc_url, "tensorrt_llm", served.metrics_url,
                      [LoadPoint("concurrency", 2), LoadPoint("rate", 50.0)], num_prompts=N, warmup=1,
                      slo_ms={"ttft": 60_000, "tpot": 60_000})
    return asyncio.run(run_bench(cfg, prompts, tok, show_progress=False))


def test_counts_and_token_totals_are_exact(runs):
    for r in runs:
        assert (r["completed"], r["failed"], r["num_prompts"]) == (N, 0, N)
        assert r["total_input_tokens"] == N * ISL and r["input_lens"] == [ISL] * N
        assert r["total_output_tokens"] == N * OSL and r["output_lens"] == [OSL] * N
        # one gap per response after the first (vLLM's itl); a response carries several tokens when the model's
        # response thread fell behind the engine (triton_repo/models/tensorrt_llm_reference.py)
        assert all(len(gaps) <= OSL - 1 for gaps in r["itls"])
        assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # a lax SLO: all good
        assert r["max_concurrent_requests"] <= (2 if r["label"] == "c2" else N)


def test_per_request_server_timings_and_triton_statistics(runs):
    for r in runs:
        for t, ttft, e2e in zip(r["server_timings"], r["ttfts"], r["latencies"], strict=True):
            assert (t["arrival_time_ns"] <= t["first_scheduled_time_ns"] <= t["first_token_time_ns"]
                    <= t["last_token_time_ns"])
            server_s = (t["last_token_time_ns"] - t["arrival_time_ns"]) / 1e9
            assert 0 < server_s <= e2e and 0 < ttft <= e2e
        assert r["triton_stats"]["tensorrt_llm"]["requests"] == N  # warm-up excluded
        assert r["client_cpu_s"] > 0 and r["client_cpu_s_per_request"] == pytest.approx(r["client_cpu_s"] / N)
        assert r["metrics_series"] and all("waiting" in s for s in r["metrics_series"])


def test_result_files_use_vllm_names_and_plots_are_pngs(runs, tmp_path):
    written = write_results(runs, tmp_path, {"isl": ISL})
    one = json.loads(written["c2"].read_text())
    for key in ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "request_goodput", "output_throughput", "total_token_throughput", "input_lens", "output_lens",
                "ttfts", "itls", "generated_texts", "errors", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "p99_itl_ms", "mean_e2el_ms", "max_concurrency", "request_rate"):
        assert key in one, key
    assert one["request_rate"] == "inf" and json.loads(written["r50"].read_text())["request_rate"] == 50.0
    assert [r["label"] for r in load_runs(written["bench"])] == ["c2", "r50"]
    for name in ("throughput_latency", "latency_distributions"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[name].stat().st_size > 10_000


def test_duration_bounds_a_point_and_rate_points_cap_concurrency(served, tok):
    prompts = random_prompts(tok, 60, ISL, OSL, seed=3)
    cfg = BenchConfig(served.grpc_url, "tensorrt_llm", None, [LoadPoint("concurrency", 1)], num_prompts=60,
                      duration_s=0.3, warmup=0)
    (r,) = asyncio.run(run_bench(cfg, prompts, tok, show_progress=False))
    assert 1 <= r["num_prompts"] < 60 and r["failed"] == 0 and max(r["start_times"]) < 0.3
    cfg = BenchConfig(served.grpc_url, "tensorrt_llm", None, [LoadPoint("rate", math.inf, max_concurrency=1)],
                      num_prompts=4, warmup=0)
    (r,) = asyncio.run(run_bench(cfg, prompts, tok, show_progress=False))
    assert r["max_concurrent_requests"] == 1 and r["completed"] == 4
    assert sorted(r["queue_times"])[-1] > 0  # all arrived at once: the later ones waited in the client


def test_prefix_cache_hit_rate_is_measured_per_point(served, tok, runs):
    """Prompts sharing two of their three 16-token blocks, one at a time after a warm-up: every prompt finds both
    cached, as the prompts alone predict; the random prompts of `runs` share nothing but their first token."""
    prompts = random_prompts(tok, 7, 40, 4, seed=4, shared_prefix=33)
    cfg = BenchConfig(served.grpc_url, "tensorrt_llm", served.metrics_url, [LoadPoint("concurrency", 1)],
                      num_prompts=6, warmup=1)
    (r,) = asyncio.run(run_bench(cfg, prompts, tok, show_progress=False))
    assert r["kv_tokens_per_block"] == served.recipe.build.tokens_per_block == 16
    assert (r["kv_cache_reused_blocks"], r["kv_cache_missed_blocks"]) == (12, 6)
    assert r["kv_cache_hit_rate"] == r["prompt_prefix_hit_rate"] == pytest.approx(2 / 3)
    for other in runs:
        assert other["kv_cache_hit_rate"] == other["prompt_prefix_hit_rate"] == 0.0
    # the same prefix once more: the response's perf metrics count the shared blocks
    got = _perf_metrics(served, list(prompts[0].input_ids[:33]) + [5, 6, 7, 8, 9, 10, 11])
    assert (got["kv_cache_reused_blocks"], got["kv_cache_alloc_new_blocks"], got["kv_cache_alloc_total_blocks"]) \
        == (2, 1, 3)


def _perf_metrics(served, ids: list[int]) -> dict[str, int]:
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from enginesmith.client.grpc_stream import infer_inputs

    client = grpcclient.InferenceServerClient(served.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
                  "request_output_len": np.array([[2]], np.int32), "return_perf_metrics": np.array([[True]])}
        client.async_stream_infer("tensorrt_llm", infer_inputs(inputs), request_id="perf")
        result, error = results.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    assert error is None, error
    return {n: int(result.as_numpy(n).reshape(-1)[0]) for n in ("kv_cache_reused_blocks", "kv_cache_alloc_new_blocks",
                                                               "kv_cache_alloc_total_blocks")}


def test_ensemble_bench_counts_tokens_from_the_model(served, tok):
    prompts = random_prompts(tok, 3, ISL, OSL, seed=2)
    cfg = BenchConfig(served.grpc_url, "ensemble", None, [LoadPoint("concurrency", 3)], num_prompts=3, warmup=0)
    (r,) = asyncio.run(run_bench(cfg, prompts, tok, show_progress=False))
    assert r["contract"] == "text" and r["completed"] == 3 and r["total_output_tokens"] == 3 * OSL
    assert r["triton_stats"]["preprocessing"]["requests"] == 3


def test_bench_command_writes_results_and_analysis(served, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", served.grpc_url, "--tokenizer", str(served.tokenizer_dir), "--concurrency", "1,2",
        "--num-prompts", "3", "--isl", "40", "--osl", "4", "--shared-prefix", "33", "--warmup", "0",
        "--output-dir", str(tmp_path), "--metrics-url", served.metrics_url, "--goodput", "ttft:60000",
        "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "KV hit" in result.output
    assert {"c1.json", "c2.json", "bench.json", "analysis.md", "throughput_latency.png"} <= {
        p.name for p in tmp_path.iterdir()}
    runs = load_runs(tmp_path / "bench.json")
    assert [r["total_output_tokens"] for r in runs] == [12, 12] and runs[0]["slo_ms"] == {"ttft": 60000.0}
    assert runs[1]["prompt_prefix_hit_rate"] == pytest.approx(2 / 3)  # c1 sent the shared prefix before
    assert "# Bottleneck analysis" in (tmp_path / "analysis.md").read_text()


def test_bench_command_reports_bad_input(served):
    r = CliRunner().invoke(app, ["bench", served.grpc_url, "--tokenizer", str(served.tokenizer_dir),
                                 "--concurrency", "0,2"])
    assert r.exit_code == 1 and "--concurrency '0,2': every value must be > 0" in r.output
    r = CliRunner().invoke(app, ["bench", served.grpc_url])
    assert r.exit_code == 1 and "no tokenizer found" in r.output
    r = CliRunner().invoke(app, ["bench", served.grpc_url, "--tokenizer", str(served.tokenizer_dir), "--isl", "8",
                                 "--shared-prefix", "8"])
    assert r.exit_code == 1 and "shared prefix of 8 tokens: it must be >= 0 and shorter than the input length 8" \
        in r.output.replace("\n", " ")
