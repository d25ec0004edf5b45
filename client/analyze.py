"""Bottleneck analysis of a benchmark run: where the time went, which resource binds, what to change.

Order of the verdict (the first that holds wins):
1. client: the load generator's own CPU is saturated, so the numbers measure the client;
2. queueing: requests spend >= QUEUE_SHARE of their E2E waiting to be scheduled (and longer than their
   prefill); the cause is KV capacity when KV blocks were exhausted while requests queued, batch slots when
   every slot was taken, else the engine's throughput against the offered load;
3. tokenizer: the pre/postprocessing models take >= TOKENIZER_SHARE of E2E;
4. overhead: time outside the runtime (network, Triton, client) is >= OVERHEAD_SHARE of E2E;
5. otherwise the larger of prefill and decode, with the roofline part that dominates its floor (compute,
   HBM bandwidth, interconnect); far below the floor (< 5 %) software overhead binds, not the hardware.

KV-cache reuse: the prefill check counts only the prompt tokens the server computed (the prompt minus the
blocks the prefix cache served, from the bench's reused-block count, else the plan's cached prefix); the hit
rate the server measured and the one the prompts allow are evidence, and the latter ranks the "enable KV-cache
reuse" countermeasure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enginesmith.client.countermeasures import Countermeasure, countermeasures
from enginesmith.client.roofline_check import LOW_EFFICIENCY, PhaseCheck, PlanRef, check_decode, check_prefill
from enginesmith.client.timesplit import Pressure, TimeSplit, pressure, split_time, tokenizer_s

QUEUE_SHARE = 0.25
CLIENT_CPU = 0.9
TOKENIZER_SHARE = 0.25
OVERHEAD_SHARE = 0.4
KV_EXHAUSTED = 0.3
SLOTS_FULL = 0.5


@dataclass
class Analysis:
    label: str
    bottleneck: str
    """queueing | prefill | decode | client | tokenizer | overhead | none"""
    resource: str
    """KV capacity | batch slots | engine throughput | compute | HBM bandwidth | interconnect |
    software overhead | client CPU | tokenizer | network/Triton | unknown"""
    summary: str
    evidence: list[str]
    split: TimeSplit
    pressure: Pressure
    prefill: PhaseCheck | None = None
    decode: PhaseCheck | None = None
    countermeasures: list[Countermeasure] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "bottleneck": self.bottleneck, "resource": self.resource,
                "summary": self.summary, "evidence": self.evidence, "split": self.split.to_dict(),
                "pressure": self.pressure.__dict__,
                "prefill": self.prefill.to_dict() if self.prefill else None,
                "decode": self.decode.to_dict() if self.decode else None,
                "countermeasures": [c.__dict__ for c in self.countermeasures], "run": self.run}


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("completed", "failed", "request_throughput", "output_throughput", "request_goodput",
            "goodput_fraction", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
            "median_e2el_ms", "client_cpu_utilization", "client_cpu_utilization_max_proc", "client_cpu_s_per_request",
            "client_procs", "load_mode", "load_value")
    return {k: run.get(k) for k in keys}


def _decode_batch(run: dict[str, Any], sp: TimeSplit, pr: Pressure) -> float:
    """Sequences sharing a decode step: the runtime's gauge, else Little's law on the decode phase."""
    if pr.samples and pr.mean_scheduled > 0:
        return pr.mean_scheduled
    return max(1.0, run["request_throughput"] * sp.decode_s)


def reused_tokens_per_request(run: dict[str, Any]) -> float:
    """Prompt tokens the prefix cache served per request in this run (0 without reuse counters)."""
    blocks, tpb = run.get("kv_cache_reused_blocks"), run.get("kv_tokens_per_block")
    n = run.get("completed", 0) + run.get("failed", 0)
    return blocks * tpb / n if blocks and tpb and n else 0.0


def _roofline(run: dict[str, Any], sp: TimeSplit, pr: Pressure, ref: PlanRef | None):
    if ref is None or sp.source != "server-timings":
        return None, None
    ok = [i for i, e in enumerate(run["errors"]) if not e]
    isl = float(np.mean([run["input_lens"][i] for i in ok]))
    osl = float(np.mean([run["output_lens"][i] for i in ok]))
    reused = reused_tokens_per_request(run)
    if run.get("kv_cache_reused_blocks") is None and ref.kv_cache_reuse:  # no /metrics: what the plan expects
        reused = min(ref.cached_prefix_tokens, isl - 1)
    computed = max(1.0, isl - reused)
    pre = check_prefill(ref, computed, sp.prefill_s) if sp.prefill_s > 0 else None
    dec = None
    if sp.server_tpot_s > 0:
        dec = check_decode(ref, _decode_batch(run, sp, pr), isl + osl / 2, sp.server_tpot_s)
    return pre, dec


def _queue_cause(pr: Pressure) -> tuple[str, str]:
    if pr.queued_samples and pr.kv_exhausted_while_queued >= KV_EXHAUSTED:
        return "KV capacity", (f"KV blocks exhausted in {pr.kv_exhausted_while_queued:.0%} of the samples with "
                               f"requests waiting (min free {pr.min_kv_free:.0f} of {pr.kv_max:.0f})")
    if pr.queued_samples and pr.slots_full_while_queued >= SLOTS_FULL:
        return "batch slots", (f"all {pr.max_batch:.0f} batch slots busy in {pr.slots_full_while_queued:.0%} "
                               f"of the samples with requests waiting")
    if pr.samples and not pr.queued_samples and pr.max_batch and pr.max_active >= pr.max_batch:
        return "batch slots", (f"requests queued (server timings) while all {pr.max_batch:.0f} batch slots were "
                               "busy; no /metrics sample caught the wait queue itself")
    return "engine throughput", "requests arrive faster than the engine completes them"


def _verdict(run: dict[str, Any], sp: TimeSplit, pr: Pressure, pre, dec) -> tuple[str, str, list[str]]:
    ev = [f"E2E {1e3 * sp.e2e_s:.1f} ms = queue {1e3 * sp.queue_s:.1f} ({sp.share('queue'):.0%}) + prefill "
          f"{1e3 * sp.prefill_s:.1f} ({sp.share('prefill'):.0%}) + decode {1e3 * sp.decode_s:.1f} "
          f"({sp.share('decode'):.0%}) + outside the runtime {1e3 * sp.overhead_s:.1f} ({sp.share('overhead'):.0%})"
          f" [{sp.source}, {sp.requests} requests]"]
    cpu = run.get("client_cpu_utilization_max_proc", run.get("client_cpu_utilization", 0.0))
    procs = run.get("client_procs", 1)
    who = f"the busiest of {procs} client processes" if procs > 1 else "client CPU"
    ev.append(f"{who} {cpu:.0%} of one core, {1e3 * run.get('client_cpu_s_per_request', 0.0):.2f} ms/request")
    if pr.samples:
        ev.append(f"/metrics: max waiting {pr.max_waiting:.0f}, mean active {pr.mean_active:.1f} of "
                  f"{pr.max_batch:.0f} slots, min free KV blocks {pr.min_kv_free:.0f}/{pr.kv_max:.0f}, "
                  f"waiting grew {pr.waiting_slope:+.2f} req/s")
    if cpu >= CLIENT_CPU:
        return "client", "client CPU", ev
    if sp.share("queue") >= QUEUE_SHARE and sp.queue_s >= sp.prefill_s:
        resource, why = _queue_cause(pr)
        ev.append(why)
        if sp.queue_trend > 0.5:
            ev.append(f"queueing time grows through the run (correlation with send time {sp.queue_trend:.2f})")
        return "queueing", resource, ev
    tok = tokenizer_s(run)
    if sp.e2e_s > 0 and tok / sp.e2e_s >= TOKENIZER_SHARE:
        ev.append(f"pre/postprocessing models: {1e3 * tok:.1f} ms per request ({tok / sp.e2e_s:.0%} of E2E)")
        return "tokenizer", "tokenizer", ev
    if sp.share("overhead") >= OVERHEAD_SHARE:
        return "overhead", "network/Triton", ev
    phase, check = ("prefill", pre) if sp.prefill_s > sp.decode_s else ("decode", dec)
    if check is None:
        return phase, "unknown", ev
    ev.append(f"{phase}: measured {1e3 * check.measured_s:.3f} ms vs roofline floor {1e3 * check.floor_s:.3f} ms "
              f"({check.efficiency:.1%} of roofline speed; floor set by {check.bound_by})")
    return phase, ("software overhead" if check.efficiency < LOW_EFFICIENCY else check.bound_by), ev


def analyze_run(run: dict[str, Any], ref: PlanRef | None = None) -> Analysis:
    """The bottleneck verdict for one load point of a bench result."""
    sp = split_time(run)
    pr = pressure(run.get("metrics_series", []))
    label = run.get("label", "")
    if sp.requests == 0:
        return Analysis(label, "none", "unknown", "no request completed: nothing to analyse", [], sp, pr,
                        run=_run_summary(run))
    pre, dec = _roofline(run, sp, pr, ref)
    bottleneck, resource, evidence = _verdict(run, sp, pr, pre, dec)
    for check in (pre, dec):
        if check is not None:
            unit = "TFLOP/s" if check.phase == "prefill" else "GB/s"
            scale = 1e12 if check.phase == "prefill" else 1e9
            evidence.append(f"{check.phase} achieved {check.achieved / scale:.3g} {unit} per GPU of "
                            f"{check.peak / scale:.3g} peak ({check.achieved / check.peak:.2%})")
    if dec is not None and ref is not None and ref.decode_comm_s > 0:
        evidence.append(f"planned communication {1e3 * ref.decode_comm_s:.3f} ms per decode step = "
                        f"{ref.decode_comm_s / dec.measured_s:.1%} of the measured step")
    if (reuse := _reuse_evidence(run)) is not None:
        evidence.append(reuse)
    stats = run.get("triton_stats") or {}
    if stats:
        evidence.append("Triton statistics, mean queue/compute ms per request: " + ", ".join(
            f"{m} {s.get('queue_ms_mean', 0.0):.2f}/{s.get('compute_infer_ms_mean', 0.0):.2f} (x{int(s['requests'])})"
            for m, s in sorted(stats.items())))
    summary = f"{label}: {bottleneck} binds ({resource})"
    if bottleneck in ("prefill", "decode") and resource == "software overhead":
        summary += "; the runtime is far from the hardware roofline"
    cms = countermeasures(bottleneck, resource, run, sp, pr, pre, dec, ref)
    return Analysis(label, bottleneck, resource, summary, evidence, sp, pr, pre, dec, cms, _run_summary(run))


def _reuse_evidence(run: dict[str, Any]) -> str | None:
    rate, allowed = run.get("kv_cache_hit_rate"), run.get("prompt_prefix_hit_rate")
    if rate is None and not allowed:
        return None
    served = ("no prefix-cache lookups measured (KV-cache reuse off?)" if rate is None else
              f"prefix cache hit {rate:.0%} of prompt blocks ({run['kv_cache_reused_blocks']:.0f} reused, "
              f"{run['kv_cache_missed_blocks']:.0f} missed; {reused_tokens_per_request(run):.0f} prompt tokens per "
              "request not recomputed)")
    return served + ("" if allowed is None else f"; the prompts' shared prefixes allow {allowed:.0%}")


def analyze_runs(runs: list[dict[str, Any]], ref: PlanRef | None = None) -> list[Analysis]:
    return [analyze_run(r, ref) for r in runs]


def sla_knee(analyses: list[Analysis]) -> str:
    """The first sweep point that misses the SLA (goodput below 90 % of requests), if any."""
    for a in analyses:
        frac = a.run.get("goodput_fraction")
        if frac is not None and not math.isnan(frac) and frac < 0.9:
            return f"{a.label} is the first load point where fewer than 90% of requests meet the SLA ({frac:.0%})"
    return "every load point keeps >= 90% of requests within the SLA" if analyses and analyses[0].run.get(
        "goodput_fraction") is not None else "no SLA given: goodput not measured"
