"""Prometheus metrics of the reference runtime, through Triton's custom-metrics API (`pb_utils.MetricFamily`).

Families are named like the TensorRT-LLM backend's where they overlap (`nv_trt_llm_request_metrics`,
`nv_trt_llm_kv_cache_block_metrics`, `nv_trt_llm_inflight_batcher_metrics`, `nv_trt_llm_general_metrics`,
`nv_llm_input_token_len`, `nv_llm_output_token_len`), with the same category labels; what the C++ backend
lacks (TTFT/ITL/batch-size histograms, tokens/s) gets `nv_trt_llm_*` names of the same style. KV-cache reuse:
`kv_cache_block_type="reused"` (upstream's label) and `"missed"` count the prompt blocks found in / missing from
the prefix cache since start, as TensorRT-LLM's KvCacheStats do (totals that only grow: a hit rate over a window
is the difference of two scrapes, reused / (reused + missed)).

Every update is an IPC round trip to the server process, so gauges are written at most once per `period_s`
(the backend's `stats_check_period_ms` plays the same role) and latency observations are buffered until then.
A histogram takes one observation per call, so a period's writes are a round trip per output token: with
`publisher=True` (the served model) they are made by a thread of their own, never by the thread calling the
hooks (the engine's loop, or the engine process's receiver).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

TOKEN_LEN_BUCKETS = [10, 50, 100, 500, 1000]
"""Buckets of nv_llm_input_token_len / nv_llm_output_token_len, as the TensorRT-LLM backend uses."""
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

_GAUGES = {
    # family: (description, category label, values)
    "nv_trt_llm_request_metrics": ("TRT-LLM request metrics", "request_type",
                                   ["active", "max", "scheduled", "context", "waiting"]),
    "nv_trt_llm_kv_cache_block_metrics": ("TRT-LLM KV cache block metrics", "kv_cache_block_type",
                                          ["max", "free", "used", "tokens_per", "fraction", "reused", "missed"]),
    "nv_trt_llm_inflight_batcher_metrics": ("TRT-LLM inflight_batcher-specific metrics",
                                            "inflight_batcher_specific_metric",
                                            ["total_context_tokens", "generation_requests", "micro_batch_id",
                                             "paused_requests"]),
    "nv_trt_llm_general_metrics": ("General TRT-LLM metrics", "general_type", ["timestamp", "iteration_counter"]),
    "nv_trt_llm_output_tokens_per_second": ("Output tokens per second over the last metrics period", None, [""]),
}
_PER_ITERATION = [("nv_trt_llm_request_metrics", c) for c in ("active", "scheduled", "context", "waiting")] + [
    ("nv_trt_llm_inflight_batcher_metrics", c) for c in ("total_context_tokens", "generation_requests",
                                                         "paused_requests")]
"""Gauges of what one iteration ran or left waiting: all 0 once the engine is idle."""
_HISTOGRAMS = {
    "nv_llm_input_token_len": ("TRT-LLM input token length per request", "total_input_tokens", TOKEN_LEN_BUCKETS),
    "nv_llm_output_token_len": ("TRT-LLM output token length per request", "total_output_tokens",
                                TOKEN_LEN_BUCKETS),
    "nv_trt_llm_time_to_first_token_seconds": ("Arrival to first output token, seconds", None, LATENCY_BUCKETS_S),
    "nv_trt_llm_inter_token_latency_seconds": ("Time between consecutive output tokens of a request, seconds",
                                               None, LATENCY_BUCKETS_S),
    "nv_trt_llm_iteration_batch_size": ("Sequences (context + generation) per engine iteration", None,
                                        BATCH_BUCKETS),
}
_COUNTERS = {
    "nv_trt_llm_output_tokens_total": "Output tokens generated",
    "nv_trt_llm_input_tokens_total": "Input (prompt) tokens processed",
    "nv_trt_llm_completed_requests_total": "Requests finished (completed, stopped or cancelled)",
}


class TritonMetrics:
    """The runtime's metrics hook: call the `on_*` methods from the engine loop (any thread)."""

    def __init__(self, pb_utils: Any, model_name: str, version: str = "1", *, max_batch_size: int | None = None,
                 tokens_per_block: int | None = None, period_s: float = 0.1, clock=time.monotonic,
                 publisher: bool = False):
        self._pb = pb_utils
        self._base = {"model": model_name, "version": str(version)}
        self._period_s = period_s
        self._clock = clock
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one flush at a time: a later one's values are written last
        self._families: list[Any] = []
        self.gauges = {name: self._gauge_metrics(name, *spec) for name, spec in _GAUGES.items()}
        self.histograms = {name: self._histogram(name, *spec) for name, spec in _HISTOGRAMS.items()}
        self.counters = {name: self._counter(name, desc) for name, desc in _COUNTERS.items()}
        self._pending: dict[str, list[float]] = {name: [] for name in _HISTOGRAMS}
        self._state: dict[tuple[str, str], float] = {}
        self._iterations = 0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._published_active = 0
        self._last_flush = clock()
        if max_batch_size is not None:
            self._state[("nv_trt_llm_request_metrics", "max")] = max_batch_size
        if tokens_per_block is not None:
            self._state[("nv_trt_llm_kv_cache_block_metrics", "tokens_per")] = tokens_per_block
        self.flush()
        self._wake = threading.Event()
        self._closed = False
        self._publisher: threading.Thread | None = None
        if publisher:
            self._publisher = threading.Thread(target=self._publish, name="metrics-publisher", daemon=True)
            self._publisher.start()

    # -- construction -------------------------------------------------------------------------
    def _family(self, name: str, description: str, kind: Any) -> Any:
        fam = self._pb.MetricFamily(name=name, description=description, kind=kind)
        self._families.append(fam)  # a family must outlive its metrics
        return fam

    def _labels(self, label: str | None, value: str) -> dict[str, str]:
        return {**self._base, label: value} if label else dict(self._base)

    def _gauge_metrics(self, name: str, description: str, label: str | None, values: list[str]) -> dict:
        fam = self._family(name, description, self._pb.MetricFamily.GAUGE)
        return {v: fam.Metric(labels=self._labels(label, v)) for v in values}

    def _histogram(self, name: str, description: str, label_value: str | None, buckets: list[float]) -> Any:
        fam = self._family(name, description, self._pb.MetricFamily.HISTOGRAM)
        labels = self._labels("response_metric_type", label_value) if label_value else dict(self._base)
        return fam.Metric(labels=labels, buckets=list(buckets))

    def _counter(self, name: str, description: str) -> Any:
        return self._family(name, description, self._pb.MetricFamily.COUNTER).Metric(labels=dict(self._base))

    # -- hooks --------------------------------------------------------------------------------
    def on_iteration(self, batch_size: int, num_context: int, num_generation: int, kv_used_blocks: int,
                     kv_free_blocks: int, active: int, queued: int, *, num_context_tokens: int | None = None,
                     paused: int = 0, kv_reused_blocks: int | None = None, kv_missed_blocks: int | None = None) -> None:
        """One engine step: who ran, who waits, and the KV pool after the step; `kv_reused_blocks` /
        `kv_missed_blocks` are the prefix cache's totals so far."""
        total_blocks = kv_used_blocks + kv_free_blocks
        with self._lock:
            self._iterations += 1
            self._state.update({
                ("nv_trt_llm_request_metrics", "active"): active,
                ("nv_trt_llm_request_metrics", "scheduled"): batch_size,
                ("nv_trt_llm_request_metrics", "context"): num_context,
                ("nv_trt_llm_request_metrics", "waiting"): queued,
                ("nv_trt_llm_kv_cache_block_metrics", "max"): total_blocks,
                ("nv_trt_llm_kv_cache_block_metrics", "free"): kv_free_blocks,
                ("nv_trt_llm_kv_cache_block_metrics", "used"): kv_used_blocks,
                ("nv_trt_llm_kv_cache_block_metrics", "fraction"): kv_used_blocks / max(total_blocks, 1),
                ("nv_trt_llm_inflight_batcher_metrics", "generation_requests"): num_generation,
                ("nv_trt_llm_inflight_batcher_metrics", "paused_requests"): paused,
                ("nv_trt_llm_general_metrics", "iteration_counter"): self._iterations,
            })
            if num_context_tokens is not None:
                self._state[("nv_trt_llm_inflight_batcher_metrics", "total_context_tokens")] = num_context_tokens
            for category, total in (("reused", kv_reused_blocks), ("missed", kv_missed_blocks)):
                if total is not None:
                    self._state[("nv_trt_llm_kv_cache_block_metrics", category)] = total
            self._pending["nv_trt_llm_iteration_batch_size"].append(batch_size)
        if active and not self._published_active:
            self._flush_soon()  # idle -> busy: publish at once, not a period later (short requests would never show)
        else:
            self._maybe_flush()

    def on_idle(self) -> None:
        """The engine has nothing left to run: what the last iteration scheduled is over. Publishes now."""
        with self._lock:
            self._state.update({(family, category): 0 for family, category in _PER_ITERATION})
        self.flush()

    def on_first_token(self, ttft_s: float) -> None:
        """A request's first output token, `ttft_s` after its arrival."""
        with self._lock:
            self._pending["nv_trt_llm_time_to_first_token_seconds"].append(ttft_s)
            self._counts["nv_trt_llm_output_tokens_total"] += 1
        self._maybe_flush()

    def on_token(self, itl_s: float) -> None:
        """Each later output token, `itl_s` after the previous one of the same request."""
        with self._lock:
            self._pending["nv_trt_llm_inter_token_latency_seconds"].append(itl_s)
            self._counts["nv_trt_llm_output_tokens_total"] += 1
        self._maybe_flush()

    def on_request_done(self, num_input_tokens: int, num_output_tokens: int) -> None:
        with self._lock:
            self._pending["nv_llm_input_token_len"].append(num_input_tokens)
            self._pending["nv_llm_output_token_len"].append(num_output_tokens)
            self._counts["nv_trt_llm_input_tokens_total"] += num_input_tokens
            self._counts["nv_trt_llm_completed_requests_total"] += 1
        self._maybe_flush()

    # -- writing ------------------------------------------------------------------------------
    def _maybe_flush(self) -> None:
        if self._clock() - self._last_flush >= self._period_s:
            self._flush_soon()

    def _flush_soon(self) -> None:
        """Flush now, in this thread, or have the publisher thread do it."""
        if self._publisher is None:
            self.flush()
        else:
            self._wake.set()

    def _publish(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            try:
                self.flush()
            except Exception:  # a failed write must not stop the ones after it
                logging.getLogger(__name__).exception("publishing the runtime's metrics failed")

    def close(self) -> None:
        """Stop the publisher thread (if any) and write what is pending."""
        self._closed = True
        if self._publisher is not None:
            self._wake.set()
            self._publisher.join(timeout=10)
        self.flush()

    def flush(self) -> None:
        """Write every pending value to Triton now (also called by the runtime at shutdown)."""
        with self._write_lock:
            self._write()

    def _write(self) -> None:
        with self._lock:
            now = self._clock()
            elapsed, self._last_flush = now - self._last_flush, now
            state, self._state = self._state, {}
            self._published_active = state.get(("nv_trt_llm_request_metrics", "active"), self._published_active)
            pending = {k: v for k, v in self._pending.items() if v}
            self._pending = {name: [] for name in _HISTOGRAMS}
            counts, self._counts = self._counts, dict.fromkeys(_COUNTERS, 0)
        state[("nv_trt_llm_general_metrics", "timestamp")] = time.time() * 1e6
        if elapsed > 0:
            state[("nv_trt_llm_output_tokens_per_second", "")] = counts["nv_trt_llm_output_tokens_total"] / elapsed
        for (family, category), value in state.items():
            self.gauges[family][category].set(float(value))
        for name, values in pending.items():
            for v in values:
                self.histograms[name].observe(float(v))
        for name, n in counts.items():
            if n:
                self.counters[name].increment(float(n))
