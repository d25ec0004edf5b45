"""benchmarks/runtime.py at toy shapes on the CPU, and the random models and baselines it relies on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from enginesmith.runtime.model.emulate import emulate_logits
from enginesmith.runtime.engine.kv_cache import PagedKVCache
from enginesmith.runtime.model.paged_attention import SeqSpan
from enginesmith.runtime.model.plain_step import plain_forward
from enginesmith.runtime.model.random_model import TINY_LLAMA, TINY_MIXTRAL, checkpoint_config, random_rank_model
from tests.support import REPO_ROOT

PROMPTS = [[5, 17, 33, 2, 99], [120, 7, 8, 250, 1, 42, 3]]


def run_bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "runtime.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.runtime", "--device", "cpu", "--tiny", "--out", str(out),
                           *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "section" in proc.stdout.splitlines()[-1] or "metric" in proc.stdout  # the summary table
    return json.loads(out.read_text())


@pytest.mark.parametrize("shape,tp,ep", [(TINY_LLAMA, 2, 1), (TINY_MIXTRAL, 2, 2), (TINY_MIXTRAL, 2, 1)])
def test_random_model_ranks_compose_to_the_single_rank_model(shape, tp, ep):
    one = [random_rank_model(checkpoint_config(shape), seed=3)]
    cfg = checkpoint_config(shape, tp_size=tp, moe_ep_size=ep)
    ranks = [random_rank_model(cfg, r, seed=3) for r in range(tp)]
    ref = emulate_logits(one, PROMPTS)
    assert torch.allclose(emulate_logits(ranks, PROMPTS), ref, atol=1e-5)
    assert not torch.allclose(emulate_logits([random_rank_model(checkpoint_config(shape), seed=4)], PROMPTS), ref)


def test_transformers_model_shares_weights_and_computes_the_same_logits():
    from benchmarks.runtime_hf import hf_llama_sharing

    model = random_rank_model(checkpoint_config(TINY_LLAMA), seed=1)
    hf = hf_llama_sharing(model)
    assert hf.model.layers[0].mlp.up_proj.weight.data_ptr() == model.layers[0].gate.data_ptr()
    cache = PagedKVCache(num_layers=2, num_kv_heads=2, head_size=16, num_blocks=8, tokens_per_block=4)
    cache.reserve(1, len(PROMPTS[1]))
    ref = plain_forward(model, cache, [SeqSpan(1, 0, len(PROMPTS[1]))], PROMPTS[1])
    with torch.no_grad():
        out = hf(torch.tensor([PROMPTS[1]])).logits[0, -1:]
    assert torch.allclose(out, ref, atol=1e-5)


def test_tiny_single_gpu_sections_write_every_number(tmp_path):
    r = run_bench(tmp_path)
    assert r["errors"] == {}
    assert r["hw"]["copy_gbps"] > 0 and r["hw"]["matmul_tflops"] > 0
    for name in ("decode", "moe"):
        d = r[name]
        assert d["fast"]["tok_s"] > 0 and d["plain"]["tok_s"] > 0 and d["roofline_tok_s"] > 0
        assert 0 < d["fast"]["pct_roofline"] < 100
        assert d["fast"]["device_fed"]["same_tokens"] and d["fast"]["device_fed"]["tok_s"] > 0  # token fed on device
        assert d["fast_vs_plain"]["max_rel_err"] < 1e-4 and d["fast_vs_plain"]["argmax_agreement"] == 1.0
        assert d["greedy_prefix_match"] == d["fast"]["tokens"] or d["greedy_prefix_match"] == d["plain"]["tokens"]
    s = r["serving"]
    assert s["engine"]["output_tokens"] == s["output_tokens"] and s["engine"]["fast_steps"] > 0
    assert s["hf_static"]["requests_measured"] == s["requests"] and s["speedup_vs_static"] > 0
    assert "tok_s" in s["hf_continuous"] or "error" in s["hf_continuous"]


@pytest.mark.slow
def test_tiny_tp_and_pp_sections_run_real_ranks(tmp_path):
    r = run_bench(tmp_path, "--sections", "tp,pp")
    assert r["errors"] == {}
    tp = r["tp"]
    assert tp["greedy_prefix_match"] == tp["tokens_compared"] > 0  # tp=2 generates tp=1's tokens (float32)
    check = tp["logits_check"]  # the prefill logits of both layouts agree to float32 rounding
    assert check["same_top1"] and check["rel_err"] < 1e-5 and check["max_abs_diff"] < 1e-3 * check["logit_std"]
    assert "prefill_logits" not in tp["tp1"] and "prefill_logits" not in tp["tp2"]
    assert tp["tp2"]["1"]["tok_s"] > 0 and tp["speedup_batch1_latency"] > 0
    for run in (tp["tp1"]["1"], tp["tp2"]["1"], tp["tp2"]["4"]):  # device-fed and host-synced loops, same tokens
        assert run["ms_per_step_host_sync"] > 0 and "device_fed_tokens_differ_at_step" not in run
    pp = r["pp"]
    assert set(pp["measured_bubble"]) == {"1", "2", "4", "8"} and len(pp["stage_s"]) == 2
    assert pp["plot"] is None or pp["plot"].endswith(".png")


def test_tp_ceiling_splits_each_step_into_streaming_and_fixed_costs():
    """tp=1 streams 4 GB in 1 ms of its 1.2 ms step (0.2 ms fixed); tp=2 streams half: with tp=1's fixed costs
    and 2 x 10 all-reduces of 5 us the step would be 0.8 ms (1.5x), with free all-reduces 0.7 ms."""
    from benchmarks.runtime_parallel import ceiling

    one = {"step_bytes": 4_000_000_000, "copy_gbps": 4000.0, "1": {"ms_per_step": 1.2}}
    two = {"step_bytes": 2_000_000_000, "1": {"ms_per_step": 0.9}, "allreduce_micro": {"fast_us": 5.0}}
    c = ceiling(one, two, "1", layers=10)["ceiling"]
    assert c["tp1_stream_ms"] == pytest.approx(1.0) and c["tp1_fixed_ms"] == pytest.approx(0.2)
    assert c["tp2_stream_ms"] == pytest.approx(0.5) and c["tp2_fixed_ms"] == pytest.approx(0.4)
    assert c["allreduces_per_step"] == 20 and c["allreduce_us"] == 5.0
    assert c["speedup_ceiling"] == pytest.approx(1.5)
    assert c["speedup_ceiling_free_allreduce"] == pytest.approx(1.2 / 0.7)
    with_exchange = ceiling(one, two | {"1": {"ms_per_step": 0.75}, "1_collectives": {"ms_per_step": 0.9}}, "1",
                            layers=10)["ceiling"]  # the main row ran the TP exchange: the collective step is split
    assert with_exchange["tp2_fixed_ms"] == pytest.approx(0.4)
    no_micro = ceiling(one, {k: v for k, v in two.items() if k != "allreduce_micro"}, "1", layers=10)["ceiling"]
    assert "speedup_ceiling" not in no_micro and no_micro["speedup_ceiling_free_allreduce"] > 1
    assert ceiling({"1": {"ms_per_step": 1.0}}, two, "1", layers=10) == {}  # CPU runs report no bandwidth


def test_tp_ceiling_report_splits_out_the_allreduces_and_marks_the_target(tmp_path):
    """benchmarks.kernels.tp_ceiling over a results folder: only runs with a ceiling count; tp=2's fixed part loses the
    all-reduces' share; the target step is tp=1's over 1.7."""
    from benchmarks.kernels import tp_ceiling

    c = dict(tp1_stream_ms=1.0, tp1_fixed_ms=0.2, tp2_stream_ms=0.5, tp2_fixed_ms=0.4, allreduces_per_step=20,
             allreduce_us=5.0, speedup_ceiling=1.5, speedup_ceiling_free_allreduce=1.2 / 0.7)
    run = {"tp": {"ceiling": c, "speedup_batch1_latency": 1.33, "model": {"shape": "llama-3-8b", "layers": 10}}}
    (tmp_path / "runtime-x-tp-a.json").write_text(json.dumps(run))
    (tmp_path / "runtime-x-decode.json").write_text(json.dumps({"decode": {}}))  # no tp section: left out
    rows = tp_ceiling.rows(tmp_path)
    assert [r["file"] for r in rows] == ["runtime-x-tp-a.json"]
    r = rows[0]
    assert r["tp2"]["allreduce_ms"] == pytest.approx(0.1) and r["tp2"]["fixed_ms"] == pytest.approx(0.3)
    assert r["tp2_step_for_target_ms"] == pytest.approx(1.2 / 1.7) and r["model"] == "llama-3-8b, 10 layers"
    assert "1.33x" in tp_ceiling.table(rows) and "1.50x" in tp_ceiling.table(rows)
    assert r["tp2_no_allreduce_ms"] is None  # this run did not time the step without all-reduces
    run["tp"] |= {"tp2": {"1_no_allreduce": {"ms_per_step": 0.7}}, "speedup_batch1_latency_no_allreduce": 1.71}
    (tmp_path / "runtime-x-tp-a.json").write_text(json.dumps(run))
    rows = tp_ceiling.rows(tmp_path)
    assert rows[0]["tp2_no_allreduce_ms"] == 0.7 and "1.71x" in tp_ceiling.table(rows)
    png = tp_ceiling.plot(rows, tmp_path / "c.png")
    assert png is None or png.stat().st_size > 1000
    assert rows[0]["speedup_exchange"] is None


def test_tp_ceiling_splits_the_collective_step_of_a_run_whose_main_row_ran_the_exchange(tmp_path):
    """Since the TP exchange kernels are the default, "1" is the exchange step and "1_collectives" the one-shot
    all-reduce step: the report recomputes the split from the collective one and shows both speedups."""
    from benchmarks.kernels import tp_ceiling

    one = {"step_bytes": 4_000_000_000, "copy_gbps": 4000.0, "1": {"ms_per_step": 1.2}}
    two = {"step_bytes": 2_000_000_000, "1": {"ms_per_step": 0.75}, "1_collectives": {"ms_per_step": 0.9},
           "allreduce_micro": {"fast_us": 5.0}}
    stored = dict(tp1_stream_ms=1.0, tp1_fixed_ms=0.2, tp2_stream_ms=0.5, tp2_fixed_ms=0.25, allreduces_per_step=20,
                  allreduce_us=5.0, speedup_ceiling=1.5, speedup_ceiling_free_allreduce=1.2 / 0.7)
    run = {"tp": {"ceiling": stored, "tp1": one, "tp2": two, "speedup_batch1_latency": 1.6,
                  "speedup_batch1_latency_collectives": 1.33, "model": {"shape": "llama-3-8b", "layers": 10}}}
    (tmp_path / "runtime-x-tp-b.json").write_text(json.dumps(run))
    r = tp_ceiling.rows(tmp_path)[0]
    assert r["tp2"]["fixed_ms"] == pytest.approx(0.3) and r["tp2"]["allreduce_ms"] == pytest.approx(0.1)
    assert r["measured_speedup"] == 1.33 and r["speedup_exchange"] == 1.6 and r["tp2_exchange_ms"] == 0.75
    assert "1.60x" in tp_ceiling.table([r])


def test_logits_check_measures_the_layouts_difference():
    from benchmarks.runtime_parallel import logits_check

    one = torch.tensor([0.0, 5.0, 4.999, -3.0])
    tie = logits_check(one, torch.tensor([0.0, 4.999, 5.0, -3.0]))  # the top two swapped by a rounding-sized move
    assert not tie["same_top1"] and tie["rel_err"] < 1e-3
    assert tie["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)
    assert tie["tp1_top2_margin"] == pytest.approx(1e-3, rel=1e-2)
    far = logits_check(one, torch.tensor([0.0, 5.0, 1.0, -3.0]))
    assert far["same_top1"] and far["max_abs_diff"] == pytest.approx(3.999) and far["rel_err"] > 0.5
    same = logits_check(one, one.clone())
    assert same["same_top1"] and same["rel_err"] == 0.0 and same["max_abs_diff"] == 0.0
