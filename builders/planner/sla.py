"""The verdict of a plan against the recipe's SLA, naming the binding constraint."""

from __future__ import annotations

from dataclasses import dataclass

from enginesmith.builders.planner.hardware import GIB
from enginesmith.builders.recipe_sections import SlaSection
from enginesmith.builders.planner.roofline import PhaseEstimate

# Checked in this order; the first failing one is the binding constraint.
CHECK_ORDER = ("memory", "kv_capacity", "batch", "tpot", "ttft", "e2e")


@dataclass(frozen=True, slots=True)
class SlaCheck:
    name: str
    """memory | kv_capacity | batch | ttft | tpot | e2e"""
    estimate: float
    target: float
    unit: str
    ok: bool
    bound_by: str
    """compute | memory bandwidth | communication | KV capacity | memory capacity | max_batch_size"""
    detail: str

    @property
    def usage(self) -> float:
        """estimate / target: above 1 fails."""
        return self.estimate / self.target if self.target else float("inf")


@dataclass(frozen=True, slots=True)
class SlaVerdict:
    meets: bool
    binding: str
    """The constraint closest to (or past) its limit."""
    binding_check: str
    summary: str
    checks: list[SlaCheck]


def _latency(name: str, est: float, target: float, bound_by: str) -> SlaCheck:
    ok = est <= target
    return SlaCheck(name, est, target, "ms", ok, bound_by,
                    f"{name.upper()} {est:,.1f} ms {'<=' if ok else '>'} {target:,.1f} ms target ({bound_by})")


def sla_checks(sla: SlaSection, *, used_bytes: int, gpu_bytes: int, kv_tokens: int, max_seq_len: int,
               concurrency: int, max_batch_size: int, prefill: PhaseEstimate, decode: PhaseEstimate,
               cached_prefix: int = 0) -> list[SlaCheck]:
    """Every check that applies to this recipe, in CHECK_ORDER. `cached_prefix`: prompt tokens every request
    shares through KV-cache reuse, whose blocks the cache holds once."""
    fits = used_bytes < gpu_bytes
    checks = [SlaCheck("memory", used_bytes / GIB, gpu_bytes / GIB, "GiB", fits, "memory capacity",
                       f"weights + workspace {used_bytes / GIB:,.1f} GiB {'<' if fits else '>='} "
                       f"{gpu_bytes / GIB:,.1f} GiB per GPU")]
    need = concurrency * (sla.isl + sla.osl - cached_prefix) + cached_prefix
    kv_ok = kv_tokens >= need and kv_tokens >= max_seq_len
    own = (f"{concurrency} x (isl {sla.isl} + osl {sla.osl})" if not cached_prefix else
           f"{concurrency} x (isl {sla.isl} + osl {sla.osl} - shared {cached_prefix}) + shared {cached_prefix}")
    detail = (f"KV cache holds {kv_tokens:,} tokens; {own} = {need:,} needed"
              + ("" if kv_tokens >= max_seq_len else f", and one max_seq_len={max_seq_len} sequence"))
    checks.append(SlaCheck("kv_capacity", max(need, max_seq_len), kv_tokens, "tokens", kv_ok, "KV capacity", detail))
    if concurrency > max_batch_size:
        checks.append(SlaCheck("batch", concurrency, max_batch_size, "seqs", False, "max_batch_size",
                               f"{concurrency} requests in flight > build.max_batch_size={max_batch_size}: "
                               "the rest queue; raise max_batch_size"))
    if sla.tpot_ms is not None:
        checks.append(_latency("tpot", decode.estimate_ms, sla.tpot_ms, decode.bound_by))
    if sla.ttft_ms is not None:
        checks.append(_latency("ttft", prefill.estimate_ms, sla.ttft_ms, prefill.bound_by))
    if sla.e2e_ms is not None:
        e2e = prefill.estimate_ms + (sla.osl - 1) * decode.estimate_ms
        bound = decode.bound_by if (sla.osl - 1) * decode.estimate_ms >= prefill.estimate_ms else prefill.bound_by
        checks.append(_latency("e2e", e2e, sla.e2e_ms, bound))
    return checks


def verdict(checks: list[SlaCheck]) -> SlaVerdict:
    """Meets when every check passes; the binding constraint is the first failure, else the tightest check."""
    failed = [c for c in checks if not c.ok]
    if failed:
        worst = failed[0]
        return SlaVerdict(False, worst.bound_by, worst.name, f"misses the SLA: {worst.detail}", checks)
    tightest = max(checks, key=lambda c: c.usage)
    return SlaVerdict(True, tightest.bound_by, tightest.name,
                      f"meets the SLA; tightest: {tightest.detail} ({tightest.usage:.0%} used)", checks)
