"""Server-side evidence during a run: Triton's statistics extension and a /metrics time series.

- `/v2/models/stats` (gRPC `get_inference_statistics`): cumulative per-model request counts and queue /
  compute durations; a run's share is the difference of two snapshots.
- `/metrics` (Prometheus text): the runtime's gauges (`nv_trt_llm_request_metrics`, KV blocks) and
  Triton's `nv_inference_pending_request_count`, sampled every `period_s` while the run goes; the prefix
  cache's reused / missed block totals before and after a point give its hit rate (`reuse_delta`).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_DURATIONS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


_SAMPLED = ("nv_trt_llm_request_metrics", "nv_trt_llm_kv_cache_block_metrics", "nv_inference_pending_request_count")


def parse_prometheus(text: str, prefixes: tuple[str, ...] = ("",)) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every sample line (whose name starts with one of `prefixes`)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#") or not line.startswith(prefixes):
            continue
        m = _LINE.match(line)
        if m:
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def _runtime_model(samples: list[tuple[str, dict[str, str], float]], prefer: str) -> str | None:
    models = {lab.get("model") for name, lab, _ in samples if name == "nv_trt_llm_request_metrics"}
    for m in (prefer, "tensorrt_llm"):
        if m in models:
            return m
    return sorted(m for m in models if m)[0] if models - {None} else None


def metrics_sample(text: str, prefer_model: str) -> dict[str, float]:
    """The gauges that tell queueing and KV pressure apart, for the runtime's model."""
    samples = parse_prometheus(text, _SAMPLED)  # sampled often during a run: skip everything else cheaply
    model = _runtime_model(samples, prefer_model)
    out: dict[str, float] = {}
    pending = 0.0
    for name, lab, v in samples:
        if name == "nv_inference_pending_request_count":
            pending += v
        if lab.get("model") != model:
            continue
        if name == "nv_trt_llm_request_metrics":
            out[lab.get("request_type", "")] = v
        elif name == "nv_trt_llm_kv_cache_block_metrics":
            out["kv_" + lab.get("kv_cache_block_type", "")] = v
    out["pending"] = pending
    return out


def metric_total(text: str, name: str, model: str | None = None) -> float:
    """Sum of one family's samples (optionally for one model), e.g. a counter or a histogram's _count."""
    return sum(v for n, lab, v in parse_prometheus(text, (name,))
               if n == name and (model is None or lab.get("model") == model))


def reuse_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Prefix-cache blocks reused and missed between two `metrics_sample`s, and the hit rate reused / (reused +
    missed); None where the runtime reports no such totals (or, for the rate, looked no block up)."""
    if "kv_reused" not in after or "kv_missed" not in after:
        return {"kv_cache_reused_blocks": None, "kv_cache_missed_blocks": None, "kv_cache_hit_rate": None}
    reused = after["kv_reused"] - before.get("kv_reused", 0.0)
    missed = after["kv_missed"] - before.get("kv_missed", 0.0)
    return {"kv_cache_reused_blocks": reused, "kv_cache_missed_blocks": missed,
            "kv_cache_hit_rate": reused / (reused + missed) if reused + missed > 0 else None}


def stats_snapshot(stats_json: dict[str, Any]) -> dict[str, dict[str, int]]:
    """model -> {<duration>_count, <duration>_ns, executions, inferences} from a stats response."""
    snap = {}
    for m in stats_json.get("model_stats", []):
        inf = m.get("inference_stats", {})
        row = {"executions": int(m.get("execution_count", 0) or 0), "inferences": int(m.get("inference_count", 0) or 0)}
        for d in _DURATIONS:
            row[f"{d}_count"] = int(inf.get(d, {}).get("count", 0) or 0)
            row[f"{d}_ns"] = int(inf.get(d, {}).get("ns", 0) or 0)
        snap[m["name"]] = row
    return snap


def stats_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per model, what happened between two snapshots: request count and mean duration per phase (ms)."""
    out = {}
    for model, a in after.items():
        b = before.get(model, {})
        d = {k: a[k] - b.get(k, 0) for k in a}
        if d["success_count"] <= 0 and d["executions"] <= 0:
            continue
        row: dict[str, float] = {"requests": d["success_count"], "executions": d["executions"]}
        for phase in _DURATIONS:
            n = d[f"{phase}_count"]
            row[f"{phase}_ms_mean"] = d[f"{phase}_ns"] / n / 1e6 if n else 0.0
        out[model] = row
    return out


class MetricsPoller:
    """Samples /metrics every `period_s` in the background of an asyncio run."""

    def __init__(self, url: str, prefer_model: str, period_s: float = 0.25):
        self.url, self.prefer_model, self.period_s = url, prefer_model, period_s
        self.series: list[dict[str, float]] = []
        self.errors = 0
        self.last_text = ""
        self._task: asyncio.Task | None = None
        self._http = None
        self._t0 = 0.0

    async def open(self) -> None:
        """Import and connect before the measured window (their CPU is not the benchmark's)."""
        import httpx

        self._http = httpx.AsyncClient(timeout=2.0, verify=False)  # plain http: no CA bundle to load
        await self._sample()

    async def _sample(self) -> None:
        import httpx

        try:
            r = await self._http.get(self.url)
            self.last_text = r.text
            if self._t0:
                self.series.append({"t": time.monotonic() - self._t0, **metrics_sample(r.text, self.prefer_model)})
        except httpx.HTTPError:
            self.errors += 1

    async def _run(self) -> None:
        while True:
            await self._sample()
            await asyncio.sleep(self.period_s)

    async def settled(self, timeout_s: float = 2.0) -> dict[str, float]:
        """A sample taken once the runtime is idle (no active or waiting request), so the totals it publishes
        when it goes idle are in it; the last one taken if it does not settle within `timeout_s`."""
        import httpx

        deadline, sample = time.monotonic() + timeout_s, {}
        while True:
            try:
                sample = metrics_sample((await self._http.get(self.url)).text, self.prefer_model)
            except httpx.HTTPError:
                self.errors += 1
            if (sample and not sample.get("active") and not sample.get("waiting")) or time.monotonic() > deadline:
                return sample
            await asyncio.sleep(0.05)

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[dict[str, float]]:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._http is not None:
            await self._http.aclose()
        return self.series
