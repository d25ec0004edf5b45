"""enginesmith.runtime.engine.metrics.TritonMetrics: family names and labels (with a small fake pb_utils), and
/metrics scraped from the real served tiny model while a benchmark runs."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from enginesmith.client.server_stats import metric_total, metrics_sample, parse_prometheus
from enginesmith.runtime.engine.metrics import TOKEN_LEN_BUCKETS, TritonMetrics


class FakeMetric:
    def __init__(self, labels, buckets=None):
        self.labels, self.buckets = labels, buckets
        self.sets, self.increments, self.observations = [], [], []
        self.writers: set[str] = set()
        """Names of the threads that wrote to it."""

    def set(self, v):
        self.writers.add(threading.current_thread().name)
        self.sets.append(v)

    def increment(self, v):
        self.writers.add(threading.current_thread().name)
        self.increments.append(v)

    def observe(self, v):
        self.writers.add(threading.current_thread().name)
        self.observations.append(v)


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    registry: dict[str, FakeFamily] = {}

    def __init__(self, name, description, kind):
        self.name, self.kind, self.metrics = name, kind, []
        FakeFamily.registry[name] = self

    def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' name
        m = FakeMetric(labels, buckets)
        self.metrics.append(m)
        return m


class FakePbUtils:
    MetricFamily = FakeFamily


def metric(name, **labels):
    fam = FakeFamily.registry[name]
    return next(m for m in fam.metrics if all(m.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def hook():
    FakeFamily.registry = {}
    now = [0.0]
    m = TritonMetrics(FakePbUtils, "tensorrt_llm", "1", max_batch_size=8, tokens_per_block=16, period_s=0.1,
                      clock=lambda: now[0])
    return m, now


def test_families_use_the_tensorrt_llm_backend_names_and_labels(hook):
    reg = FakeFamily.registry
    assert reg["nv_trt_llm_request_metrics"].kind == "gauge"
    assert {m.labels["request_type"] for m in reg["nv_trt_llm_request_metrics"].metrics} == {
        "active", "max", "scheduled", "context", "waiting"}
    assert {m.labels["kv_cache_block_type"] for m in reg["nv_trt_llm_kv_cache_block_metrics"].metrics} == {
        "max", "free", "used", "tokens_per", "fraction", "reused", "missed"}
    h = metric("nv_llm_input_token_len")
    assert reg["nv_llm_input_token_len"].kind == "histogram" and h.buckets == TOKEN_LEN_BUCKETS
    assert h.labels == {"model": "tensorrt_llm", "version": "1", "response_metric_type": "total_input_tokens"}
    assert reg["nv_trt_llm_time_to_first_token_seconds"].kind == "histogram"
    assert reg["nv_trt_llm_output_tokens_total"].kind == "counter"
    assert metric("nv_trt_llm_request_metrics", request_type="max").sets == [8.0]  # written at start


def test_updates_are_batched_per_period_and_flushed_with_the_latest_values(hook):
    m, now = hook
    m.on_iteration(3, 1, 2, kv_used_blocks=5, kv_free_blocks=11, active=3, queued=4, num_context_tokens=40)
    active = metric("nv_trt_llm_request_metrics", request_type="active")
    assert active.sets == [3.0]  # idle -> busy is published at once
    m.on_first_token(0.25)
    m.on_token(0.01)
    now[0] = 0.05
    m.on_iteration(2, 0, 2, kv_used_blocks=6, kv_free_blocks=10, active=2, queued=1)
    assert active.sets == [3.0]  # within the period: held back
    now[0] = 0.2
    m.on_token(0.02)  # period over: everything pending is written now, latest values only
    assert active.sets == [3.0, 2.0]
    assert metric("nv_trt_llm_request_metrics", request_type="waiting").sets == [4.0, 1.0]
    assert metric("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="max").sets == [16.0, 16.0]
    assert metric("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="fraction").sets == [5 / 16, 6 / 16]
    ctx = metric("nv_trt_llm_inflight_batcher_metrics", inflight_batcher_specific_metric="total_context_tokens")
    assert ctx.sets == [40.0]
    assert metric("nv_trt_llm_iteration_batch_size").observations == [3.0, 2.0]
    assert metric("nv_trt_llm_time_to_first_token_seconds").observations == [0.25]
    assert metric("nv_trt_llm_inter_token_latency_seconds").observations == [0.01, 0.02]
    assert metric("nv_trt_llm_output_tokens_total").increments == [3.0]
    assert metric("nv_trt_llm_output_tokens_per_second").sets == [pytest.approx(3 / 0.2)]
    m.on_iteration(0, 0, 0, kv_used_blocks=0, kv_free_blocks=16, active=0, queued=0)
    m.flush()  # the runtime flushes when it goes idle
    now[0] = 0.21
    m.on_iteration(1, 1, 0, kv_used_blocks=1, kv_free_blocks=15, active=1, queued=0)
    assert active.sets == [3.0, 2.0, 0.0, 1.0]  # busy again right after an idle flush: published at once


def test_going_idle_zeroes_what_the_last_iteration_scheduled(hook):
    """The last iteration ran one request; once the engine is idle nothing is scheduled any more."""
    m, now = hook
    m.on_iteration(1, 0, 1, kv_used_blocks=0, kv_free_blocks=16, active=0, queued=0, num_context_tokens=0)
    m.on_idle()
    for family, label, values in [
            ("nv_trt_llm_request_metrics", "request_type", ("scheduled", "context", "active", "waiting")),
            ("nv_trt_llm_inflight_batcher_metrics", "inflight_batcher_specific_metric",
             ("generation_requests", "paused_requests", "total_context_tokens"))]:
        for v in values:
            assert metric(family, **{label: v}).sets[-1] == 0.0, v
    assert metric("nv_trt_llm_request_metrics", request_type="max").sets[-1] == 8.0
    assert metric("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="free").sets[-1] == 16.0


def test_prefix_cache_totals_are_the_reused_and_missed_block_gauges(hook):
    m, now = hook
    m.on_iteration(1, 1, 0, kv_used_blocks=4, kv_free_blocks=12, active=1, queued=0)  # reuse off: not written
    m.on_iteration(1, 1, 0, kv_used_blocks=4, kv_free_blocks=12, active=1, queued=0, kv_reused_blocks=3,
                   kv_missed_blocks=5)
    now[0] = 0.2
    m.on_iteration(1, 1, 0, kv_used_blocks=4, kv_free_blocks=12, active=1, queued=0, kv_reused_blocks=7,
                   kv_missed_blocks=6)
    reused = metric("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="reused")
    assert reused.sets == [7.0]  # the idle -> busy flush came before the first totals
    assert metric("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="missed").sets == [6.0]


def test_request_done_feeds_token_histograms_and_counters(hook):
    m, now = hook
    m.on_request_done(num_input_tokens=12, num_output_tokens=7)
    m.on_request_done(num_input_tokens=30, num_output_tokens=2)
    m.flush()
    assert metric("nv_llm_input_token_len").observations == [12.0, 30.0]
    assert metric("nv_llm_output_token_len").observations == [7.0, 2.0]
    assert metric("nv_trt_llm_input_tokens_total").increments == [42.0]
    assert metric("nv_trt_llm_completed_requests_total").increments == [2.0]


def test_hooks_are_safe_from_several_threads(hook):
    m, now = hook
    threads = [threading.Thread(target=lambda: [m.on_token(0.001) for _ in range(500)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m.flush()
    assert sum(metric("nv_trt_llm_output_tokens_total").increments) == 2000
    assert len(metric("nv_trt_llm_inter_token_latency_seconds").observations) == 2000


def test_with_a_publisher_the_periods_writes_leave_the_hooks_caller(hook):
    """Served, a period's writes (a round trip each, one per output token for the latency histograms) are made by
    the publisher thread, so the engine's loop does not wait for them; idle and close still publish the end state."""
    _, now = hook
    FakeFamily.registry = {}
    m = TritonMetrics(FakePbUtils, "tensorrt_llm", "1", max_batch_size=8, period_s=0.1, clock=lambda: now[0],
                      publisher=True)
    caller = threading.current_thread().name
    m.on_iteration(2, 1, 1, kv_used_blocks=3, kv_free_blocks=13, active=2, queued=0)  # idle -> busy: at once
    now[0] = 0.05
    m.on_first_token(0.2)
    for _ in range(300):
        m.on_token(0.01)
    now[0] = 0.2
    m.on_token(0.03)  # the period is over
    itl = metric("nv_trt_llm_inter_token_latency_seconds")
    deadline = time.monotonic() + 10
    while len(itl.observations) < 301 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert itl.observations == [0.01] * 300 + [0.03]
    assert metric("nv_trt_llm_request_metrics", request_type="active").sets[-1] == 2.0
    writers = set().union(*(x.writers for fam in FakeFamily.registry.values() for x in fam.metrics))
    assert writers == {caller, "metrics-publisher"}  # the caller only wrote the start-up values
    assert itl.writers == {"metrics-publisher"}
    m.on_idle()
    m.on_token(0.04)
    m.close()
    assert metric("nv_trt_llm_request_metrics", request_type="active").sets[-1] == 0.0
    assert itl.observations[-1] == 0.04


def test_prometheus_parsing_of_labels_and_values():
    text = ('# HELP x y\nnv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 3\n'
            'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 12\n'
            'nv_inference_pending_request_count{model="ensemble",version="1"} 2\n')
    samples = parse_prometheus(text)
    assert samples[0] == ("nv_trt_llm_request_metrics", {"model": "tensorrt_llm", "request_type": "waiting",
                                                         "version": "1"}, 3.0)
    assert metrics_sample(text, "ensemble") == {"waiting": 3.0, "kv_free": 12.0, "pending": 2.0}
    assert metric_total(text, "nv_inference_pending_request_count") == 2.0


def _totals(text: str) -> dict[str, float]:
    m = "tensorrt_llm"
    return {"ttft": metric_total(text, "nv_trt_llm_time_to_first_token_seconds_count", m),
            "tokens": metric_total(text, "nv_trt_llm_output_tokens_total", m),
            "done": metric_total(text, "nv_llm_output_token_len_count", m),
            "out_sum": metric_total(text, "nv_llm_output_token_len_sum", m),
            "in_sum": metric_total(text, "nv_llm_input_token_len_sum", m)}


@pytest.mark.server
@pytest.mark.timeout(300)
def test_metrics_of_the_served_model_during_and_after_a_bench_run():
    from enginesmith.client.bench import BenchConfig, LoadPoint, run_bench
    from enginesmith.client.dataset import random_prompts
    from enginesmith.client.tokenizer import load_tokenizer
    from tests.client_served import MAX_BATCH, served_tiny

    served = served_tiny()
    tok = load_tokenizer(served.tokenizer_dir)
    before = _totals(httpx.get(served.metrics_url).text)
    n, isl, osl = 24, 10, 24
    cfg = BenchConfig(served.grpc_url, "tensorrt_llm", served.metrics_url, [LoadPoint("concurrency", 12)],
                      num_prompts=n, warmup=0, metrics_period_s=0.05)
    (run,) = asyncio.run(run_bench(cfg, random_prompts(tok, n, isl, osl, seed=9), tok, show_progress=False))
    series = run["metrics_series"]  # scraped from /metrics while the requests ran
    assert max(s["active"] for s in series) >= 1 and max(s["scheduled"] for s in series) <= MAX_BATCH, series
    assert max(s["waiting"] for s in series) >= 1, series  # 12 in flight, 2 slots: waiting however loaded the machine
    assert all(s["max"] == MAX_BATCH for s in series) and max(s["kv_used"] for s in series) >= 2, series
    expected = {"ttft": n, "tokens": n * osl, "done": n, "out_sum": n * osl, "in_sum": n * isl}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # counters are published on the next flush (at most one period later)
        after = _totals(httpx.get(served.metrics_url).text)
        delta = {k: after[k] - before[k] for k in after}
        if delta == expected:
            break
        time.sleep(0.2)
    assert delta == expected, (delta, expected)
    idle = metrics_sample(httpx.get(served.metrics_url).text, "tensorrt_llm")
    assert idle["active"] == 0 and idle["kv_used"] == 0 and idle["kv_free"] == idle["kv_max"]
    assert idle["scheduled"] == 0 and idle["context"] == 0 and idle["waiting"] == 0, idle
