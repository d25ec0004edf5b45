"""Aggregate request records into the `vllm bench serve` result fields (same names, same formulas).

TTFT: send -> first streamed token. ITL: every gap between streamed responses, pooled over requests
(token-weighted). TPOT: (E2E - TTFT) / (output tokens - 1) per request, then aggregated (request-weighted).
Goodput (DistServe): completed requests per second that meet every SLO given.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from enginesmith.client.record import RequestRecord

PERCENTILES = (50.0, 90.0, 95.0, 99.0)
METRICS = ("ttft", "tpot", "itl", "e2el")


def p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def describe_ms(values_s: list[float], name: str, percentiles=PERCENTILES) -> dict[str, float]:
    """mean/median/std/pNN of a list of seconds, in ms, under vLLM's key names (0 for an empty list)."""
    v = np.asarray(values_s or [0.0], dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
           f"std_{name}_ms": float(v.std())}
    for p in percentiles:
        out[f"p{p_word(p)}_{name}_ms"] = float(np.percentile(v, p))
    return out


def meets_slo(r: RequestRecord, slo_ms: dict[str, float]) -> bool:
    got = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2el": r.e2e_s}
    return all(got[k] * 1000.0 <= v for k, v in slo_ms.items())


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once (sweep over [start, end) intervals)."""
    events = sorted([(r.start_ns, 1) for r in records] + [(r.end_ns, -1) for r in records])
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def peak_tokens_per_s(records: list[RequestRecord]) -> float:
    """Most output tokens received within one 1-second bucket of the run."""
    if not records:
        return 0.0
    t0 = min(r.start_ns for r in records)
    buckets: dict[int, int] = {}
    for r in records:
        for t, n in zip(r.chunk_ns, r.chunk_tokens, strict=True):
            b = (t - t0) // 1_000_000_000
            buckets[b] = buckets.get(b, 0) + n
    return float(max(buckets.values(), default=0))


def summarize(records: list[RequestRecord], duration_s: float, slo_ms: dict[str, float] | None = None,
              percentiles=PERCENTILES) -> dict[str, Any]:
    """The vLLM result block for one run (records in issue order; failed ones included as vLLM does)."""
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    good = sum(meets_slo(r, slo_ms) for r in ok) if slo_ms else 0
    out: dict[str, Any] = {
        "duration": duration_s, "completed": len(ok), "failed": len(records) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur, "request_goodput": good / dur if slo_ms else None,
        "output_throughput": total_out / dur, "total_token_throughput": (total_in + total_out) / dur,
        "goodput_fraction": good / len(ok) if slo_ms and ok else None,
        "max_output_tokens_per_s": peak_tokens_per_s(ok), "max_concurrent_requests": peak_concurrency(ok),
    }
    out.update(describe_ms([r.ttft_s for r in ok], "ttft", percentiles))
    out.update(describe_ms([r.tpot_s for r in ok if r.output_tokens > 1], "tpot", percentiles))
    out.update(describe_ms([x for r in ok for x in r.itls_s], "itl", percentiles))
    out.update(describe_ms([r.e2e_s for r in ok], "e2el", percentiles))
    return out


def per_request_arrays(records: list[RequestRecord], t0_ns: int) -> dict[str, list]:
    """The per-request lists vLLM writes (seconds), plus server timings and ids."""
    return {
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_tokens if r.success else 0 for r in records],
        "ttfts": [r.ttft_s for r in records],
        "itls": [r.itls_s for r in records],
        "latencies": [r.e2e_s for r in records],
        "tpots": [r.tpot_s for r in records],
        "start_times": [(r.start_ns - t0_ns) / 1e9 for r in records],
        "queue_times": [r.client_queue_s for r in records],
        "generated_texts": [r.text for r in records],
        "errors": [r.error or "" for r in records],
        "request_ids": [r.request_id for r in records],
        "expected_output_lens": [r.expected_output_len for r in records],
        "server_timings": [dict(r.server_times_ns) for r in records],
    }


def finite(x: float) -> float | str:
    """JSON has no inf: write 'inf' as vLLM's request_rate does."""
    return "inf" if isinstance(x, float) and math.isinf(x) else x
