"""The bottleneck analysis on crafted runs: time split, verdict order, roofline maths, countermeasures."""

from __future__ import annotations

import pytest

from enginesmith.client.analysis_report import render_markdown, render_text
from enginesmith.client.analyze import analyze_run
from enginesmith.client.record import RequestRecord
from enginesmith.client.roofline_check import PlanRef, check_decode, check_prefill
from enginesmith.client.stats import per_request_arrays, summarize
from enginesmith.client.timesplit import split_time

MS = 1_000_000


def crafted_run(n=8, queue_ms=0.2, prefill_ms=5.0, decode_ms=70.0, out=8, outside_ms=1.0, series=(),
                cpu_util=0.1, triton_stats=None, timings=True, label="c1", stagger_ms=10.0, queue_growth_ms=0.0):
    """n requests whose server-side phases take the given times; the client sees them plus `outside_ms`."""
    recs = []
    for i in range(n):
        start = int(i * stagger_ms * MS)
        q = (queue_ms + i * queue_growth_ms) * MS
        arrival = start + int(outside_ms / 2 * MS)
        sched, first = arrival + int(q), arrival + int(q + prefill_ms * MS)
        last = first + int(decode_ms * MS)
        step = (last - first) // (out - 1)
        chunks = [first + int(outside_ms / 2 * MS) + k * step for k in range(out)]
        r = RequestRecord(f"r{i}", 20, out, issue_ns=start, start_ns=start, end_ns=chunks[-1], chunk_ns=chunks,
                          chunk_tokens=[1] * out)
        if timings:
            r.server_times_ns = {"arrival_time_ns": arrival, "first_scheduled_time_ns": sched,
                                 "first_token_time_ns": first, "last_token_time_ns": last}
        recs.append(r)
    duration = (max(r.end_ns for r in recs) - recs[0].start_ns) / 1e9
    run = {"label": label, "model_id": "tensorrt_llm", "load_mode": "concurrency", "load_value": 4,
           "max_concurrency": 4, **summarize(recs, duration, {"ttft": 100.0}), **per_request_arrays(recs, 0),
           "client_cpu_utilization": cpu_util, "client_cpu_s_per_request": 0.001,
           "metrics_series": list(series), "triton_stats": triton_stats or {}}
    return run


def series(n=10, waiting=5.0, active=2.0, max_batch=2.0, kv_free=0.0, kv_max=64.0):
    return [{"t": 0.1 * i, "waiting": waiting, "active": active, "scheduled": active, "max": max_batch,
             "kv_free": kv_free, "kv_used": kv_max - kv_free, "kv_max": kv_max} for i in range(n)]


REF = PlanRef(gpus=1, peak_flops=1e12, hbm_bytes_per_s=1e11, prefill_flops_per_token=2e9, weight_bytes=1e9,
              kv_bytes_per_token=1e5, kv_tokens=10_000, max_batch_size=2)


def test_time_split_from_server_timings():
    sp = split_time(crafted_run(queue_ms=40, prefill_ms=10, decode_ms=70, outside_ms=2, out=8))
    assert sp.source == "server-timings" and sp.requests == 8
    assert sp.queue_s == pytest.approx(0.040, abs=1e-6) and sp.prefill_s == pytest.approx(0.010, abs=1e-6)
    assert sp.decode_s == pytest.approx(0.070, abs=1e-6) and sp.overhead_s == pytest.approx(0.002, abs=2e-6)
    assert sp.server_tpot_s == pytest.approx(0.010, abs=1e-6)
    assert sp.share("queue") == pytest.approx(40 / 122, rel=1e-3)


def test_queue_trend_detects_a_growing_queue():
    assert split_time(crafted_run(queue_ms=5, queue_growth_ms=30)).queue_trend > 0.95
    assert split_time(crafted_run(queue_ms=5)).queue_trend == 0.0


def test_overload_with_exhausted_kv_names_queueing_and_kv_capacity():
    a = analyze_run(crafted_run(queue_ms=300, series=series(kv_free=0, active=1, max_batch=8)), REF)
    assert (a.bottleneck, a.resource) == ("queueing", "KV capacity")
    actions = [c.action for c in a.countermeasures]
    assert any("FP8 KV cache" in x for x in actions) and any("replicas" in x for x in actions)
    assert a.countermeasures == sorted(a.countermeasures, key=lambda c: -c.gain)


def test_overload_with_full_batch_slots_names_batch_slots():
    a = analyze_run(crafted_run(queue_ms=300, series=series(kv_free=60, active=2, max_batch=2)), REF)
    assert (a.bottleneck, a.resource) == ("queueing", "batch slots")
    assert any("build.max_batch_size (now 2)" in c.action for c in a.countermeasures)


def test_light_load_is_decode_bound_on_hbm_with_measured_efficiency():
    # one request at a time: step 10 ms, batch 1, context 20 + 8/2: bytes 1e9 + 1e5 * 24 at 1e11 B/s
    a = analyze_run(crafted_run(queue_ms=0.1, prefill_ms=5, decode_ms=70, out=8, stagger_ms=100), REF)
    assert (a.bottleneck, a.resource) == ("decode", "HBM bandwidth")
    assert a.decode.floor_s == pytest.approx((1e9 + 1e5 * 24) / 1e11, rel=1e-3)
    assert a.decode.achieved == pytest.approx((1e9 + 1e5 * 24) / 0.010, rel=1e-3)
    assert a.countermeasures[0].action.startswith("weight-only INT4")


def test_far_below_roofline_blames_software_overhead():
    fast_hw = PlanRef(**{**REF.to_dict(), "hbm_bytes_per_s": 1e13, "peak_flops": 1e15})  # floor ~0.1 ms vs 10
    a = analyze_run(crafted_run(stagger_ms=100), fast_hw)
    assert (a.bottleneck, a.resource) == ("decode", "software overhead")
    assert "CUDA graphs" in a.countermeasures[0].action


def test_prefill_dominated_run_checks_compute():
    a = analyze_run(crafted_run(prefill_ms=200, decode_ms=14, out=8), REF)
    assert a.bottleneck == "prefill"
    assert a.prefill.compute_s == pytest.approx(2e9 * 20 / 1e12)  # 40 ms floor for 20 tokens
    assert a.prefill.achieved == pytest.approx(2e9 * 20 / 0.2, rel=1e-3) and a.resource == "compute"


def test_client_cpu_saturation_wins_over_everything():
    a = analyze_run(crafted_run(queue_ms=300, cpu_util=0.97), REF)
    assert (a.bottleneck, a.resource) == ("client", "client CPU")


def test_client_saturation_is_judged_per_client_process():
    """Four processes at 60% of a core each (2.4 cores summed) are not saturated; one of them at 95% is."""
    run = {**crafted_run(queue_ms=300, cpu_util=2.4), "client_procs": 4, "client_cpu_utilization_max_proc": 0.6}
    assert analyze_run(run, REF).bottleneck != "client"
    a = analyze_run({**run, "client_cpu_utilization_max_proc": 0.95}, REF)
    assert (a.bottleneck, a.resource) == ("client", "client CPU")
    assert "the busiest of 4 client processes 95% of one core" in a.evidence[1]
    assert "bench --client-procs 8" in a.countermeasures[0].action


def test_tokenizer_models_taking_a_large_share_are_named():
    stats = {"preprocessing": {"requests": 8, "queue_ms_mean": 30.0, "compute_infer_ms_mean": 20.0},
             "postprocessing": {"requests": 64, "queue_ms_mean": 0.5, "compute_infer_ms_mean": 1.0}}
    a = analyze_run(crafted_run(triton_stats=stats), REF)
    assert (a.bottleneck, a.resource) == ("tokenizer", "tokenizer")


def test_without_server_timings_triton_queue_time_is_used():
    stats = {"tensorrt_llm": {"requests": 8, "queue_ms_mean": 150.0, "compute_infer_ms_mean": 1.0}}
    run = crafted_run(timings=False, queue_ms=150, triton_stats=stats)
    sp = split_time(run)
    assert sp.source == "triton-stats" and sp.queue_s == pytest.approx(0.150)
    assert analyze_run(run).bottleneck == "queueing"


def test_roofline_checks_by_hand():
    pp2 = PlanRef(**{**REF.to_dict(), "pp_size": 2, "decode_comm_s": 0.002})
    pre = check_prefill(pp2, 100, 0.5)
    assert pre.compute_s == pytest.approx(2 * 2e9 * 100 / 1e12) and pre.hbm_s == pytest.approx(2 * 1e9 / 1e11)
    dec = check_decode(pp2, batch=4, context_tokens=50, step_s=0.05)
    assert dec.hbm_s == pytest.approx((2e9 + 1e5 * 200) / 1e11) and dec.comm_s == 0.002
    assert dec.floor_s == pytest.approx(dec.hbm_s + 0.002) and dec.bound_by == "HBM bandwidth"
    assert dec.efficiency == pytest.approx(dec.floor_s / 0.05)


def test_plan_ref_from_the_tiny_recipe_plan():
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe
    from tests.support import REPO_ROOT

    plan = make_plan(load_recipe(REPO_ROOT / "recipes" / "tiny-llama.yaml"))
    ref = PlanRef.from_plan(plan)
    assert ref.peak_flops == pytest.approx(0.2e12) and ref.hbm_bytes_per_s == pytest.approx(20e9)
    assert ref.weight_bytes == plan.memory.weight_bytes_max and ref.max_batch_size == 16
    assert ref.prefill_flops_per_token == pytest.approx(plan.prefill.flops_per_gpu / plan.prefill.tokens)


def test_reports_render_every_run():
    runs = [crafted_run(label="c1"), crafted_run(label="c8", queue_ms=300, series=series())]
    analyses = [analyze_run(r, REF) for r in runs]
    md, text = render_markdown(analyses, REF), render_text(analyses, REF)
    assert "| c8 | queueing | KV capacity |" in md and "## c1: decode (HBM bandwidth)" in md
    assert "== c8: bottleneck = queueing (KV capacity)" in text and "countermeasures" in text


def test_analyze_command_leaves_the_bench_report_alone(tmp_path):
    """`bench` writes analysis.md with the recipe's plan; `analyze` prints, and writes markdown only when asked."""
    from typer.testing import CliRunner

    from enginesmith.builders.cli import app
    from enginesmith.client.bench_report import write_results

    written = write_results([crafted_run(label="c1"), crafted_run(label="c8", queue_ms=300, series=series())],
                            tmp_path, plots=False)
    (tmp_path / "analysis.md").write_text("the bench's report\n")
    r = CliRunner().invoke(app, ["analyze", str(written["bench"])])
    assert r.exit_code == 0, r.output
    assert "== c8: bottleneck = queueing" in r.output
    assert (tmp_path / "analysis.md").read_text() == "the bench's report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis.md", "bench.json", "c1.json", "c8.json"]
    r = CliRunner().invoke(app, ["analyze", str(written["bench"]), "--markdown", str(tmp_path / "again.md")])
    assert r.exit_code == 0, r.output
    assert "| c8 | queueing |" in (tmp_path / "again.md").read_text()
    r = CliRunner().invoke(app, ["analyze", str(written["bench"]), "--markdown", "/sys/enginesmith/x.md"])
    assert r.exit_code == 1 and "Traceback" not in r.output  # /sys takes no new folders, not even from root
    assert "error: --markdown /sys/enginesmith/x.md: cannot write /sys/enginesmith (" in r.output


def test_kv_reuse_is_ranked_from_the_prompts_measured_prefix_share():
    run = crafted_run(prefill_ms=200, decode_ms=14, out=8)
    shared = analyze_run({**run, "prompt_prefix_hit_rate": 0.9}, REF)
    assert shared.bottleneck == "prefill" and shared.countermeasures[0].action.startswith("KV-cache reuse")
    assert shared.countermeasures[0].gain == pytest.approx(shared.split.share("prefill") * 0.9)
    assert "90% of the prompt blocks repeat" in shared.countermeasures[0].effect
    assert "the prompts' shared prefixes allow 90%" in " ".join(shared.evidence)
    unique = analyze_run({**run, "prompt_prefix_hit_rate": 0.0}, REF)
    assert not any(c.action.startswith("KV-cache reuse") for c in unique.countermeasures)
    kv_bound = analyze_run({**crafted_run(queue_ms=300, series=series(kv_free=0, active=1, max_batch=8)),
                            "prompt_prefix_hit_rate": 0.5}, REF)
    reuse = next(c for c in kv_bound.countermeasures if c.action.startswith("KV-cache reuse"))
    assert "KV blocks of the prompts -50%" in reuse.effect and reuse.gain > 0


def test_with_reuse_on_the_prefill_check_counts_only_computed_tokens():
    run = {**crafted_run(prefill_ms=200, decode_ms=14, out=8), "kv_cache_reused_blocks": 16.0,
           "kv_cache_missed_blocks": 8.0, "kv_cache_hit_rate": 2 / 3, "kv_tokens_per_block": 8,
           "prompt_prefix_hit_rate": 2 / 3}
    a = analyze_run(run, REF)
    assert a.prefill.compute_s == pytest.approx(2e9 * (20 - 16 * 8 / 8) / 1e12)  # 16 of 20 tokens were cached
    assert not any(c.action.startswith("KV-cache reuse") for c in a.countermeasures)  # already on
    assert "prefix cache hit 67% of prompt blocks (16 reused, 8 missed; 16 prompt tokens per request" in \
        " ".join(a.evidence)
    without_metrics = {k: v for k, v in run.items() if not k.startswith(("kv_", "prompt_"))}
    planned = PlanRef(**{**REF.to_dict(), "kv_cache_reuse": True, "cached_prefix_tokens": 16})
    assert analyze_run(without_metrics, planned).prefill.compute_s == pytest.approx(2e9 * 4 / 1e12)
    assert analyze_run(without_metrics, REF).prefill.compute_s == pytest.approx(2e9 * 20 / 1e12)


def test_plan_ref_carries_the_plans_kv_reuse():
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe, parse_recipe
    from tests.support import REPO_ROOT

    data = load_recipe(REPO_ROOT / "recipes" / "tiny-llama.yaml").model_dump()
    data["serve"]["enable_kv_cache_reuse"], data["sla"]["shared_prefix_tokens"] = True, 50
    ref = PlanRef.from_plan(make_plan(parse_recipe(data), with_options=False))
    assert ref.kv_cache_reuse and ref.cached_prefix_tokens == 48  # whole blocks of 16
