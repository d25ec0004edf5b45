"""The analysis on real runs of the served tiny model (build.max_batch_size = 2): a crafted overload
(16 requests in flight: 14 wait for a batch slot, so the queue dominates even where a loaded machine delays
requests on their way in) is named queueing; one request at a time is not."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml
from typer.testing import CliRunner

from enginesmith.builders.cli import app
from enginesmith.client.analyze import analyze_run
from enginesmith.client.bench import BenchConfig, LoadPoint, run_bench
from enginesmith.client.bench_report import write_results
from enginesmith.client.dataset import random_prompts
from enginesmith.client.roofline_check import PlanRef
from enginesmith.client.tokenizer import load_tokenizer
from tests.client_served import MAX_BATCH

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def runs(served):
    tok = load_tokenizer(served.tokenizer_dir)
    prompts = random_prompts(tok, 33, 16, 32, seed=5)
    cfg = BenchConfig(served.grpc_url, "tensorrt_llm", served.metrics_url,
                      [LoadPoint("concurrency", 1), LoadPoint("concurrency", 16)], num_prompts=32, warmup=1,
                      metrics_period_s=0.05)
    return asyncio.run(run_bench(cfg, prompts, tok, show_progress=False))


def test_overload_is_named_queueing_for_want_of_batch_slots(served, runs):
    a = analyze_run(runs[1], PlanRef.from_plan(served.plan))
    assert a.bottleneck == "queueing", a.evidence
    assert a.resource == "batch slots", a.evidence
    assert a.split.share("queue") > 0.3 and a.pressure.max_batch == MAX_BATCH and a.pressure.max_waiting >= 1
    assert any("max_batch_size (now 2)" in c.action for c in a.countermeasures)


def test_light_load_is_not_queueing(served, runs):
    a = analyze_run(runs[0], PlanRef.from_plan(served.plan))
    assert a.bottleneck in ("decode", "prefill") and a.split.share("queue") < 0.1, a.evidence
    assert a.decode is not None and a.decode.measured_s > 0 and a.decode.achieved > 0


def test_analyze_command_with_the_plan(served, runs, tmp_path):
    written = write_results(runs, tmp_path, plots=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(served.recipe.model_dump(mode="json")))
    r = CliRunner().invoke(app, ["analyze", str(written["bench"]), "--plan", str(recipe),
                                 "--markdown", str(tmp_path / "analysis.md")])
    assert r.exit_code == 0, r.output
    assert "== c16: bottleneck = queueing (batch slots)" in r.output and "plan: 1 GPU(s)" in r.output
    md = (tmp_path / "analysis.md").read_text()
    assert "| c16 | queueing | batch slots |" in md
    r = CliRunner().invoke(app, ["analyze", str(written["c1"]), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["analyses"][0]["bottleneck"] != "queueing"
