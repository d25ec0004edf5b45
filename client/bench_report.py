"""Where a sweep goes: one vLLM-style JSON per load point, a combined bench.json, the plots, a rich table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from enginesmith.builders.manifest import atomic_write_text

BENCH_FILE = "bench.json"


def write_results(runs: list[dict[str, Any]], out_dir: str | Path, config: dict[str, Any] | None = None,
                  plots: bool = True) -> dict[str, Path]:
    """Write `<label>.json` per point (readable by `vllm bench serve` tooling), `bench.json` and PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for r in runs:
        p = out / f"{r['label']}.json"
        atomic_write_text(p, json.dumps(r, indent=1))
        written[r["label"]] = p
    atomic_write_text(out / BENCH_FILE, json.dumps({"config": config or {}, "runs": runs}, indent=1))
    written["bench"] = out / BENCH_FILE
    if plots and runs:
        from enginesmith.client.plots import latency_distributions, throughput_latency

        written["throughput_latency"] = throughput_latency(runs, out / "throughput_latency.png")
        written["latency_distributions"] = latency_distributions(runs, out / "latency_distributions.png")
    return written


def load_runs(path: str | Path) -> list[dict[str, Any]]:
    """Runs from a bench.json (all points) or from one point's file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"bench file {p}: {e}") from e
    runs = data["runs"] if isinstance(data, dict) and "runs" in data else [data]
    if not runs or not all(isinstance(r, dict) and "ttfts" in r for r in runs):
        raise ValueError(f"bench file {p}: not an `enginesmith bench` result (no runs with per-request ttfts)")
    return runs


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def kv_hit_cell(r: dict[str, Any]) -> str:
    """Prefix-cache hit rate measured by the server / that the prompts' shared prefixes allow."""
    return f"{_percent(r.get('kv_cache_hit_rate'))}/{_percent(r.get('prompt_prefix_hit_rate'))}"


def summary_table(runs: list[dict[str, Any]]):
    """One row per load point: counts, throughput, goodput, latency percentiles, client CPU, and the prefix
    cache's hit rate when the server measured one or the prompts share prefixes."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title="benchmark", show_lines=False)
    reuse = any(r.get("kv_cache_hit_rate") is not None or r.get("prompt_prefix_hit_rate") for r in runs)
    for col in ("load", "ok/fail", "in tok", "out tok", "req/s", "out tok/s", "goodput", "TTFT p50/p99 ms",
                "TPOT p50/p99 ms", "ITL p50/p99 ms", "E2E p50/p99 ms", "client CPU ms/req",
                *(["KV hit served/prompts"] if reuse else [])):
        t.add_column(col, justify="right")
    for r in runs:
        good = "-" if r.get("request_goodput") is None else f"{r['request_goodput']:.2f}/s"
        t.add_row(Text(str(r["label"])), f"{r['completed']}/{r['failed']}", str(r["total_input_tokens"]),
                  str(r["total_output_tokens"]), f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}",
                  good, *(f"{r[f'median_{m}_ms']:.1f}/{r[f'p99_{m}_ms']:.1f}" for m in ("ttft", "tpot", "itl", "e2el")),
                  f"{1e3 * r['client_cpu_s_per_request']:.2f}", *([kv_hit_cell(r)] if reuse else []))
    return t
