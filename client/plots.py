"""PNG plots of a benchmark sweep (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write through a temporary name so a PNG is never half-written under its final name."""
    import io

    from enginesmith.builders.manifest import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    _pyplot().close(fig)
    return path


def throughput_latency(runs: list[dict[str, Any]], path: Path) -> Path:
    """Output tokens/s (x) against TTFT and TPOT percentiles (y) across the sweep points."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [r["output_throughput"] for r in runs]
    for ax, metric, title in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(x, [r[f"{stat}_{metric}_ms"] for r in runs], style, label=f"{stat} {title}")
        for xi, r in zip(x, runs, strict=True):
            ax.annotate(r.get("label", ""), (xi, r[f"p99_{metric}_ms"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        slo = (runs[0].get("slo_ms") or {}).get(metric)
        top = max(r[f"p99_{metric}_ms"] for r in runs)
        if slo and slo <= 3 * top:
            ax.axhline(slo, color="red", lw=1, ls=":", label=f"SLA {slo:g} ms")
        elif slo:  # far above the data: a line there would flatten every point to the axis
            ax.plot([], [], " ", label=f"SLA {slo:g} ms (off the chart)")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def latency_distributions(runs: list[dict[str, Any]], path: Path) -> Path:
    """Empirical CDFs of TTFT and ITL, one line per sweep point."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in runs:
        ok = [e == "" for e in r["errors"]]
        ttft = np.sort([t * 1e3 for t, good in zip(r["ttfts"], ok, strict=True) if good])
        itl = np.sort([x * 1e3 for gaps, good in zip(r["itls"], ok, strict=True) if good for x in gaps])
        for ax, v in ((axes[0], ttft), (axes[1], itl)):
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=r.get("label", ""))
    for ax, title in ((axes[0], "TTFT"), (axes[1], "ITL")):
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of " + ("requests" if title == "TTFT" else "token gaps"))
        ax.set_title(f"{title} distribution (CDF)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
