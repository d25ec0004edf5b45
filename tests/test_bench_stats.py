"""The benchmark statistics on crafted request records: vLLM's formulas and field names, goodput, peaks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from enginesmith.client.bench import LoadPoint, _prompts_for
from enginesmith.client.dataset import Prompt
from enginesmith.client.record import RequestRecord
from enginesmith.client.stats import describe_ms, per_request_arrays, summarize

MS = 1_000_000


def rec(rid, start_ms, chunks, end_ms, prompt_len=10, error=None) -> RequestRecord:
    """chunks: [(arrival ms, tokens)]."""
    return RequestRecord(rid, prompt_len, 8, issue_ns=start_ms * MS, start_ns=start_ms * MS, end_ns=end_ms * MS,
                         chunk_ns=[t * MS for t, _ in chunks], chunk_tokens=[n for _, n in chunks], error=error)


@pytest.fixture
def records():
    return [rec("a", 0, [(100, 1), (150, 1), (250, 2)], 260, prompt_len=10),
            rec("b", 50, [(80, 1), (100, 1)], 100, prompt_len=6),
            rec("c", 60, [], 70, prompt_len=9, error="boom")]


def test_per_request_formulas(records):
    a, b, _ = records
    assert a.output_tokens == 4 and a.ttft_s == pytest.approx(0.1) and a.e2e_s == pytest.approx(0.26)
    assert a.itls_s == pytest.approx([0.05, 0.1])
    assert a.tpot_s == pytest.approx((0.26 - 0.1) / 3)  # (E2E - TTFT) / (tokens - 1)
    assert b.tpot_s == pytest.approx(0.02) and not records[2].success
    assert rec("d", 0, [(5, 1)], 5).tpot_s == 0.0  # one token: no TPOT (vLLM counts 0 for goodput)


def test_summary_uses_vllm_names_and_counts_only_successes(records):
    s = summarize(records, duration_s=1.0, slo_ms={"ttft": 50})
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_input_tokens"] == 16 and s["total_output_tokens"] == 6
    assert s["request_throughput"] == pytest.approx(2.0) and s["output_throughput"] == pytest.approx(6.0)
    assert s["total_token_throughput"] == pytest.approx(22.0)
    assert s["request_goodput"] == pytest.approx(1.0) and s["goodput_fraction"] == pytest.approx(0.5)
    assert s["mean_ttft_ms"] == pytest.approx(65.0) and s["median_ttft_ms"] == pytest.approx(65.0)
    assert s["p99_ttft_ms"] == pytest.approx(np.percentile([100.0, 30.0], 99))
    assert s["mean_itl_ms"] == pytest.approx(np.mean([50, 100, 20]))  # pooled over tokens
    assert s["mean_tpot_ms"] == pytest.approx(np.mean([160 / 3, 20]))  # per request
    assert s["mean_e2el_ms"] == pytest.approx(155.0)
    assert s["max_concurrent_requests"] == 2 and s["max_output_tokens_per_s"] == 6.0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p95", "p99"):
            assert f"{stat}_{metric}_ms" in s


def test_goodput_needs_every_slo(records):
    s = summarize(records, 2.0, {"ttft": 200, "tpot": 30})
    assert s["request_goodput"] == pytest.approx(0.5)  # a meets TTFT but its TPOT is 53 ms
    assert summarize(records, 2.0, None)["request_goodput"] is None


def test_per_request_arrays_keep_failed_requests_in_order(records):
    arr = per_request_arrays(records, t0_ns=0)
    assert arr["output_lens"] == [4, 2, 0] and arr["errors"] == ["", "", "boom"]
    assert arr["start_times"] == pytest.approx([0.0, 0.05, 0.06]) and arr["request_ids"] == ["a", "b", "c"]
    assert arr["itls"][0] == pytest.approx([0.05, 0.1])


def test_describe_empty_is_zero_not_nan():
    d = describe_ms([], "ttft")
    assert all(v == 0.0 and not math.isnan(v) for v in d.values())


def test_load_point_labels_and_prompt_slices():
    assert LoadPoint("concurrency", 4).label == "c4" and LoadPoint("rate", 2.5).label == "r2.5"
    assert LoadPoint("rate", math.inf).label == "rinf"
    ps = [Prompt(str(i), (i,), 1) for i in range(5)]
    assert [p.text for p in _prompts_for(ps, 4, offset=3)] == ["3", "4", "0", "1"]
