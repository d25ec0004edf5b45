"""The analysis as plain text (terminal) or markdown (bench/analysis.md)."""

from __future__ import annotations

from enginesmith.client.analyze import Analysis, sla_knee
from enginesmith.client.roofline_check import PlanRef


def _plan_line(ref: PlanRef | None) -> str:
    if ref is None:
        return "no plan given (--plan RECIPE): roofline comparison skipped"
    return (f"plan: {ref.gpus} GPU(s), tp={ref.tp_size} pp={ref.pp_size}, peak {ref.peak_flops / 1e12:.3g} TFLOP/s "
            f"and {ref.hbm_bytes_per_s / 1e9:.3g} GB/s per GPU, planned TTFT {ref.plan_ttft_ms:.2f} ms, "
            f"TPOT {ref.plan_tpot_ms:.3f} ms")


def _run_line(a: Analysis) -> str:
    r = a.run
    good = "" if r.get("goodput_fraction") is None else f", {r['goodput_fraction']:.0%} within SLA"
    return (f"{r['completed']} ok / {r['failed']} failed, {r['request_throughput']:.2f} req/s, "
            f"{r['output_throughput']:.1f} tok/s, TTFT p50/p99 {r['median_ttft_ms']:.1f}/{r['p99_ttft_ms']:.1f} ms, "
            f"TPOT p50/p99 {r['median_tpot_ms']:.2f}/{r['p99_tpot_ms']:.2f} ms{good}")


def render_text(analyses: list[Analysis], ref: PlanRef | None = None) -> str:
    lines = [_plan_line(ref), sla_knee(analyses), ""]
    for a in analyses:
        lines += [f"== {a.label}: bottleneck = {a.bottleneck} ({a.resource})", "   " + _run_line(a)]
        lines += [f"   - {e}" for e in a.evidence]
        if a.countermeasures:
            lines.append("   countermeasures (best expected effect first):")
            lines += [f"   {i}. {c.action}: {c.effect}" for i, c in enumerate(a.countermeasures, 1)]
        lines.append("")
    return "\n".join(lines)


def render_markdown(analyses: list[Analysis], ref: PlanRef | None = None) -> str:
    out = ["# Bottleneck analysis", "", _plan_line(ref), "", sla_knee(analyses), "",
           "| load | bottleneck | resource | queue | prefill | decode | outside runtime | req/s | tok/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for a in analyses:
        s = a.split
        out.append(f"| {a.label} | {a.bottleneck} | {a.resource} | {s.share('queue'):.0%} | {s.share('prefill'):.0%} "
                   f"| {s.share('decode'):.0%} | {s.share('overhead'):.0%} | {a.run['request_throughput']:.2f} "
                   f"| {a.run['output_throughput']:.1f} |")
    for a in analyses:
        out += ["", f"## {a.label}: {a.bottleneck} ({a.resource})", "", _run_line(a), ""]
        out += [f"- {e}" for e in a.evidence]
        if a.countermeasures:
            out += ["", "| # | countermeasure | expected effect |", "|---|---|---|"]
            out += [f"| {i} | {c.action} | {c.effect} |" for i, c in enumerate(a.countermeasures, 1)]
    return "\n".join(out) + "\n"
