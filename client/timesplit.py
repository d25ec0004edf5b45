"""Where each request's time went, and the server-side evidence of why (queue, KV blocks, batch slots).

With the model's timing outputs (steady clock, ns): queueing = arrival -> first scheduled, prefill = first
scheduled -> first token, decode = first token -> last token, and the rest of the client's E2E (network,
Triton, pre/postprocessing, client) is overhead. Without them, Triton's per-model queue time stands in for
queueing and TTFT for queueing + prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

_TIMES = ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")


@dataclass
class TimeSplit:
    source: str
    """server-timings | triton-stats"""
    requests: int
    e2e_s: float
    queue_s: float
    prefill_s: float
    decode_s: float
    overhead_s: float
    queue_p90_s: float = 0.0
    server_tpot_s: float = 0.0
    """Server-side decode time per token after the first (the step time a sequence sees)."""
    queue_trend: float = 0.0
    """Correlation of queueing time with send time: near 1 when the queue grows through the run."""

    def share(self, part: str) -> float:
        return getattr(self, f"{part}_s") / self.e2e_s if self.e2e_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update({f"{p}_share": self.share(p) for p in ("queue", "prefill", "decode", "overhead")})
        return d


def _ok(run: dict[str, Any]) -> list[int]:
    return [i for i, e in enumerate(run["errors"]) if not e]


def split_time(run: dict[str, Any], target_model: str | None = None) -> TimeSplit:
    """Mean time split of the run's successful requests."""
    ok = _ok(run)
    timed = [i for i in ok if all(k in run["server_timings"][i] for k in _TIMES)]
    e2e = np.array([run["latencies"][i] for i in ok] or [0.0])
    if timed and len(timed) == len(ok):
        t = {k: np.array([run["server_timings"][i][k] for i in timed], dtype=np.int64) for k in _TIMES}
        q = (t["first_scheduled_time_ns"] - t["arrival_time_ns"]) / 1e9
        pf = (t["first_token_time_ns"] - t["first_scheduled_time_ns"]) / 1e9
        dec = (t["last_token_time_ns"] - t["first_token_time_ns"]) / 1e9
        outs = np.array([max(run["output_lens"][i] - 1, 1) for i in timed])
        starts = np.array([run["start_times"][i] for i in timed])
        trend = float(np.corrcoef(starts, q)[0, 1]) if len(q) > 2 and q.std() > 0 and starts.std() > 0 else 0.0
        server = q + pf + dec
        return TimeSplit("server-timings", len(timed), float(e2e.mean()), float(q.mean()), float(pf.mean()),
                         float(dec.mean()), float(max(0.0, e2e.mean() - server.mean())),
                         float(np.percentile(q, 90)), float((dec / outs).mean()), trend)
    stats = run.get("triton_stats", {}).get(target_model or run.get("model_id", ""), {})
    q = stats.get("queue_ms_mean", 0.0) / 1e3
    ttft = np.array([run["ttfts"][i] for i in ok] or [0.0])
    dec = e2e - ttft
    outs = np.array([max(run["output_lens"][i] - 1, 1) for i in ok] or [1])
    return TimeSplit("triton-stats", len(ok), float(e2e.mean()), q, float(max(0.0, ttft.mean() - q)),
                     float(dec.mean()), 0.0, q, float((dec / outs).mean()), 0.0)


@dataclass
class Pressure:
    """What the /metrics series says about the runtime while requests waited."""

    samples: int = 0
    queued_samples: int = 0
    max_waiting: float = 0.0
    mean_active: float = 0.0
    max_active: float = 0.0
    mean_scheduled: float = 0.0
    max_batch: float = 0.0
    kv_max: float = 0.0
    min_kv_free: float = 0.0
    kv_exhausted_while_queued: float = 0.0
    """Fraction of queued samples with (almost) no free KV block."""
    slots_full_while_queued: float = 0.0
    """Fraction of queued samples with every batch slot taken."""
    waiting_slope: float = 0.0
    """Requests per second the wait queue grew by (least squares over the run)."""
    notes: list[str] = field(default_factory=list)


def pressure(series: list[dict[str, float]]) -> Pressure:
    p = Pressure(samples=len(series))
    if not series:
        p.notes.append("no /metrics samples (pass a metrics URL to the bench to see queue and KV gauges)")
        return p
    wait = np.array([s.get("waiting", 0.0) for s in series])
    active = np.array([s.get("active", 0.0) for s in series])
    p.max_waiting, p.mean_active, p.max_active = float(wait.max()), float(active.mean()), float(active.max())
    p.mean_scheduled = float(np.mean([s.get("scheduled", 0.0) for s in series]))
    p.max_batch = float(max(s.get("max", 0.0) for s in series))
    p.kv_max = float(max(s.get("kv_max", 0.0) for s in series))
    p.min_kv_free = float(min(s.get("kv_free", 0.0) for s in series))
    queued = [s for s in series if s.get("waiting", 0.0) > 0]
    p.queued_samples = len(queued)
    if queued:
        low = max(1.0, 0.02 * p.kv_max)
        p.kv_exhausted_while_queued = sum(s.get("kv_free", low + 1) <= low for s in queued) / len(queued)
        if p.max_batch > 0:
            p.slots_full_while_queued = sum(s.get("active", 0.0) >= p.max_batch for s in queued) / len(queued)
    t = np.array([s["t"] for s in series])
    if len(series) > 2 and t.std() > 0:
        p.waiting_slope = float(np.polyfit(t, wait, 1)[0])
    return p


def tokenizer_s(run: dict[str, Any]) -> float:
    """Mean time per request inside the preprocessing and postprocessing models (Triton statistics)."""
    stats = run.get("triton_stats", {})
    total = 0.0
    for name in ("preprocessing", "postprocessing"):
        s = stats.get(name)
        if s:
            total += (s.get("queue_ms_mean", 0.0) + s.get("compute_infer_ms_mean", 0.0)) / 1e3 * (
                s.get("requests", 0) / max(1, run["completed"]))
    return total
