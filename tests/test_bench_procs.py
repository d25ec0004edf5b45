"""Load points split over spawned client processes (`client_procs`, client/bench_procs.py): the split arithmetic,
and the served tiny model driven by two workers: same counts as one process, one shared origin, duration
bounds across workers, and a worker that fails or dies named in one line."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from enginesmith.builders.cli import app
from enginesmith.client.bench import BenchConfig, LoadPoint, run_bench
from enginesmith.client.bench_procs import (ClientProcsError, client_procs, plan_shares, split_even, split_weighted,
                                            worker_seed)
from enginesmith.client.dataset import random_prompts

ISL, OSL, N = 40, 6, 6
SHARED = 33  # two of each prompt's three 16-token blocks are the same in every prompt


def test_concurrency_and_rate_shares():
    shares, note = plan_shares(LoadPoint("concurrency", 5), 10, 2)
    assert [s.point for s in shares] == [LoadPoint("concurrency", 3), LoadPoint("concurrency", 2)]
    assert [(s.start, s.stop) for s in shares] == [(0, 6), (6, 10)] and note is None  # prompts follow the slots
    shares, _ = plan_shares(LoadPoint("rate", 9.0, max_concurrency=7), 11, 3)
    assert [(s.point.mode, s.point.value, s.point.max_concurrency) for s in shares] == [
        ("rate", 3.0, 3), ("rate", 3.0, 2), ("rate", 3.0, 2)]
    assert [(s.start, s.stop) for s in shares] == [(0, 4), (4, 8), (8, 11)]
    shares, _ = plan_shares(LoadPoint("rate", math.inf), 4, 2)
    assert all(math.isinf(s.point.value) and s.point.max_concurrency is None for s in shares)
    assert split_even(7, 3) == [3, 2, 2] and split_weighted(7, [2, 1]) == [5, 2] and split_weighted(3, [5, 1, 1]) \
        == [1, 1, 1]
    assert len({worker_seed(0, i) for i in range(4)} | {worker_seed(1, 0)}) == 5


def test_every_prompt_is_sent_once_and_the_load_adds_up():
    for procs in range(1, 6):
        for c in range(1, 12):
            for n in range(1, 14):
                shares, note = plan_shares(LoadPoint("concurrency", c), n, procs)
                assert [i for s in shares for i in range(s.start, s.stop)] == list(range(n))
                assert all(s.stop > s.start for s in shares) and sum(s.point.value for s in shares) == c
                assert len(shares) == min(procs, c, n) and (note is None) == (len(shares) == procs)
                shares, _ = plan_shares(LoadPoint("rate", 6.0, max_concurrency=c), n, procs)
                assert [i for s in shares for i in range(s.start, s.stop)] == list(range(n))
                assert sum(s.point.max_concurrency for s in shares) == c
                assert sum(s.point.value for s in shares) == pytest.approx(6.0)


def test_fewer_workers_when_the_point_cannot_use_them():
    shares, note = plan_shares(LoadPoint("concurrency", 1), 8, 4)
    assert len(shares) == 1 and note == "concurrency 1 for 4 client processes: ran on 1"
    shares, note = plan_shares(LoadPoint("rate", math.inf), 3, 4)
    assert len(shares) == 3 and note == "3 prompts for 4 client processes: ran on 3"
    _, note = plan_shares(LoadPoint("rate", 2.0, max_concurrency=2), 8, 4)
    assert note == "max_concurrency 2 for 4 client processes: ran on 2"


@pytest.fixture(scope="module")
def split_runs(served, tok):
    """c1 (one process: the bench's own), c4 and r50 over two workers, then c4 in one process."""
    prompts = random_prompts(tok, 3 * N + 1, ISL, OSL, seed=5, shared_prefix=SHARED)
    cfg = BenchConfig(served.grpc_url, "tensorrt_llm", served.metrics_url,
                      [LoadPoint("concurrency", 1), LoadPoint("concurrency", 4), LoadPoint("rate", 50.0)],
                      num_prompts=N, warmup=1, client_procs=2)
    two = asyncio.run(run_bench(cfg, prompts, tok, show_progress=False))
    one = asyncio.run(run_bench(replace(cfg, points=[LoadPoint("concurrency", 4)], client_procs=1, warmup=0),
                                prompts[1 + N:], tok, show_progress=False))
    return two, one[0]


@pytest.mark.server
@pytest.mark.timeout(300)
def test_two_workers_complete_what_one_process_does(split_runs, served):
    (c1, c4, r50), alone = split_runs
    assert (c1["client_procs"], c1["client_procs_note"]) == (1, "concurrency 1 for 2 client processes: ran on 1")
    for r in (c4, r50):
        assert (r["client_procs"], r["client_procs_note"], r["client_requests_per_proc"]) == (2, None, [3, 3])
        assert (r["completed"], r["failed"], r["total_output_tokens"]) == (N, 0, alone["total_output_tokens"])
        assert r["output_lens"] == alone["output_lens"] == [OSL] * N and r["input_lens"] == [ISL] * N
        assert len(set(r["request_ids"])) == N and all(text for text in r["generated_texts"])  # decoded here
        assert min(r["start_times"]) >= 0  # every worker sent after the shared origin
        assert r["triton_stats"]["tensorrt_llm"]["requests"] == N and r["metrics_series"]
        assert r["client_cpu_s"] == pytest.approx(sum(r["client_cpu_s_per_proc"]))
        assert all(cpu > 0 for cpu in r["client_cpu_s_per_proc"]) and len(r["client_cpu_s_per_proc"]) == 2
        assert r["client_cpu_utilization_max_proc"] == pytest.approx(max(r["client_cpu_s_per_proc"]) / r["duration"])
        # the prompts the workers sent count for the prefix hit rate: each finds 2 of its 3 blocks
        assert r["prompt_prefix_hit_rate"] == pytest.approx(2 / 3)
    assert c4["max_concurrent_requests"] <= 4 and alone["client_procs"] == 1


@pytest.mark.server
@pytest.mark.timeout(300)
def test_duration_bounds_every_worker_of_a_rate_point(served, tok):
    prompts = random_prompts(tok, 60, 12, 4, seed=6)
    cfg = BenchConfig(served.grpc_url, "tensorrt_llm", None, [LoadPoint("rate", 80.0)], num_prompts=60,
                      duration_s=0.25, warmup=0, client_procs=2)
    (r,) = asyncio.run(run_bench(cfg, prompts, tok, show_progress=False))
    assert r["client_procs"] == 2 and r["failed"] == 0 and all(0 < n < 30 for n in r["client_requests_per_proc"])
    assert r["num_prompts"] == sum(r["client_requests_per_proc"]) == r["completed"]
    issued = [start - queued for start, queued in zip(r["start_times"], r["queue_times"], strict=True)]
    assert 0 <= min(issued) and max(issued) < 0.25  # none issued after the origin + duration of either worker


@pytest.mark.server
@pytest.mark.timeout(120)
def test_a_failing_or_dying_worker_fails_the_point_naming_it(served, tok):
    prompts = random_prompts(tok, 4, 12, 4, seed=7)
    cfg = BenchConfig(served.grpc_url, "tensorrt_llm", client_procs=2)

    async def setup_fails():
        with client_procs(replace(cfg, model="no_such_model"), None, 2) as procs:
            await procs.wait_up()

    with pytest.raises(ClientProcsError, match=r"^client worker [01] \(pid \d+\) failed while setting up its "
                                               r"client: ClientError: model 'no_such_model': "):
        asyncio.run(setup_fails())

    async def dies():
        with client_procs(cfg, None, 2) as procs:
            await procs.wait_up()
            os.kill(procs.workers[1].proc.pid, signal.SIGKILL)
            procs.workers[1].proc.join(10)
            shares, _ = plan_shares(LoadPoint("concurrency", 2), len(prompts), 2)
            await procs.run_point(shares, prompts, None, "c2", lambda origin: None, None)

    with pytest.raises(ClientProcsError, match=r"^client worker 1 \(pid \d+\) was killed by SIGKILL "):
        asyncio.run(dies())


@pytest.mark.server
def test_client_procs_option(served, tmp_path):
    tokenizer = ["--tokenizer", str(served.tokenizer_dir)]
    r = CliRunner().invoke(app, ["bench", served.grpc_url, *tokenizer, "--client-procs", "0"])
    assert r.exit_code == 1 and "--client-procs 0: give 1 or more client processes per load point" in r.output
    r = CliRunner().invoke(app, ["bench", served.grpc_url, *tokenizer, "--client-procs", "2", "--concurrency", "1",
                                 "--num-prompts", "1", "--isl", "12", "--osl", "2", "--warmup", "0", "--no-plots",
                                 "--no-analyze", "--no-progress", "--output-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "c1: concurrency 1 for 2 client processes: ran on 1" in r.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["config"]["client_procs"] == 2 and data["runs"][0]["client_procs"] == 1
