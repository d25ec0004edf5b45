"""What bounds the batch-1 TP=2 speedup, from the tp section's results: each step split into streaming, fixed
costs and all-reduces.

Reads every benchmarks/results/runtime-*.json whose tp section carries `ceiling` (benchmarks/runtime_parallel.py:
step bytes over the run's copy bandwidth = streaming; the rest of the measured step = fixed costs; at tp=2 the
2 x layers one-shot all-reduces at their in-graph time are split out of the fixed part), prints a table and
writes tp-ceiling.json and tp-ceiling.png (stacked bars per run and tp, the 1.7x target's tp=2 step marked, and
where the run timed it, the tp=2 step with its all-reduces skipped: "1_no_allreduce", timing only, and the step
with the TP exchange kernels: runs whose main tp=2 row used them, "1_collectives" being the one split here).
Usage: python -m benchmarks.kernels.tp_ceiling [--results DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGET = 1.7


def rows(results: Path) -> list[dict]:
    from benchmarks.runtime_parallel import ceiling

    out = []
    for path in sorted(results.glob("runtime-*.json")):
        tp = json.loads(path.read_text()).get("tp") or {}
        c = tp.get("ceiling")
        if not c or "allreduce_us" not in c:
            continue
        exchange = "1_collectives" in tp.get("tp2", {})  # the main tp=2 row ran the TP exchange kernels
        if exchange:  # split the collective step (the run stored the split of the exchange one)
            c = ceiling(tp["tp1"], tp["tp2"], "1", tp["model"]["layers"])["ceiling"]
        ar_ms = c["allreduces_per_step"] * c["allreduce_us"] / 1e3
        model = tp.get("model", {})
        out.append(dict(
            file=path.name, model=f"{model.get('shape', '?')}, {model.get('layers', '?')} layers",
            tp1=dict(stream_ms=c["tp1_stream_ms"], fixed_ms=c["tp1_fixed_ms"], allreduce_ms=0.0),
            tp2=dict(stream_ms=c["tp2_stream_ms"], fixed_ms=c["tp2_fixed_ms"] - ar_ms, allreduce_ms=ar_ms),
            measured_speedup=tp["speedup_batch1_latency_collectives" if exchange else "speedup_batch1_latency"],
            ceiling=c["speedup_ceiling"],
            tp2_exchange_ms=tp["tp2"]["1"]["ms_per_step"] if exchange else None,
            speedup_exchange=tp["speedup_batch1_latency"] if exchange else None,
            ceiling_free_allreduce=c["speedup_ceiling_free_allreduce"],
            tp2_step_for_target_ms=(c["tp1_stream_ms"] + c["tp1_fixed_ms"]) / TARGET,
            # measured where the run has it: tp=2 with its all-reduces skipped (timing only, wrong tokens)
            tp2_no_allreduce_ms=(tp.get("tp2", {}).get("1_no_allreduce") or {}).get("ms_per_step"),
            speedup_no_allreduce=tp.get("speedup_batch1_latency_no_allreduce")))
    return out


def table(rs: list[dict]) -> str:
    head = (f"{'run':44s} {'model':22s} {'tp1 stream/fixed':>17s} {'tp2 stream/fixed/AR':>21s} "
            f"{'measured':>8s} {'ceiling':>8s} {'free AR':>8s} {'AR skipped':>10s} {'exchange':>9s}")
    lines = [head]
    for r in rs:
        a, b = r["tp1"], r["tp2"]
        lines.append(f"{r['file']:44s} {r['model']:22s} {a['stream_ms']:8.2f}/{a['fixed_ms']:<8.2f} "
                     f"{b['stream_ms']:7.2f}/{b['fixed_ms']:.2f}/{b['allreduce_ms']:<5.2f} "
                     f"{r['measured_speedup']:7.2f}x {r['ceiling']:7.2f}x {r['ceiling_free_allreduce']:7.2f}x "
                     + (f"{r['speedup_no_allreduce']:9.2f}x" if r["speedup_no_allreduce"] else f"{'-':>10s}")
                     + (f" {r['speedup_exchange']:8.2f}x" if r.get("speedup_exchange") else f" {'-':>9s}"))
    return "\n".join(lines)


def plot(rs: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rs)), 4.2))
    ticks, groups, seen, x, top = [], [], set(), 0.0, 0.0
    parts = (("stream_ms", "tab:blue", "streaming"), ("fixed_ms", "tab:orange", "fixed costs"),
             ("allreduce_ms", "tab:red", "all-reduces"))
    for r in rs:
        for side in ("tp1", "tp2"):
            bottom = 0.0
            for part, color, name in parts:
                ax.bar(x, r[side][part], bottom=bottom, color=color, width=0.8,
                       label=None if name in seen else name)
                seen.add(name)
                bottom += r[side][part]
            top = max(top, bottom)
            ticks.append((x, side.replace("tp", "tp=")))
            if side == "tp2" and r["tp2_no_allreduce_ms"]:
                name = "tp=2 with all-reduces skipped (measured)"
                ax.plot([x], [r["tp2_no_allreduce_ms"]], "kx", markersize=8, label=None if name in seen else name)
                seen.add(name)
            if side == "tp2" and r.get("tp2_exchange_ms"):
                name = "tp=2 with the TP exchange kernels (measured)"
                ax.plot([x], [r["tp2_exchange_ms"]], "g^", markersize=7, label=None if name in seen else name)
                seen.add(name)
            if side == "tp2":
                name = f"tp=2 step for {TARGET}x"
                ax.hlines(r["tp2_step_for_target_ms"], x - 0.45, x + 0.45, colors="k", linestyles="--",
                          label=None if name in seen else name)
                seen.add(name)
            x += 1.0
        groups.append((x - 1.5, f"{r['model']}\n{r['file'].removeprefix('runtime-').removesuffix('.json')}"))
        x += 0.6
    ax.set_xticks([p for p, _ in ticks], [t for _, t in ticks], fontsize=7)
    for gx, text in groups:
        ax.text(gx, -0.12, text, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=6)
    ax.set_ylim(0, top * 1.12)
    ax.set(ylabel="ms per decode step (batch 1)", title="TP=2 at batch 1: streaming, fixed costs, all-reduces")
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS))
    results = Path(ap.parse_args().results)
    rs = rows(results)
    print(table(rs))
    (results / "tp-ceiling.json").write_text(json.dumps(rs, indent=1) + "\n")
    png = plot(rs, results / "tp-ceiling.png")
    print(f"wrote {results / 'tp-ceiling.json'}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
