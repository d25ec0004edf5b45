"""Prefill layers three ways on one GPU: graphed (what the engine runs), compiled regions alone, eager.

A stage of 16 Llama-3-8B layers (bf16, random weights; a pp=2 stage) runs packed prompts of 512 tokens
(fewer when the step is smaller) through runtime/prefill_graphs.GraphedPrefill, its PrefillLayers
without graphs, and runtime.parallel.pipeline.run_layers, at several step sizes. Per runner and size: wall time
(median of 5 after 3 warm-ups, synchronized) and host time (until the call returns, unsynchronized: a
step is host-bound when the two are equal), the first graphed call's time (capture), and the relative
error of the graphed output against the other two. Prints a table, writes prefill-layers-<card>.json.

Usage: python -m benchmarks.kernels.prefill_layers [--layers 16] [--tokens 8192,1024,256,100] [--out DIR]
       python -m benchmarks.kernels.prefill_layers --tiny        # CPU smoke test (graphs replayed as plain calls)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from enginesmith.runtime.model.attention import DenseCausalAttention
from enginesmith.runtime.kernels.gemv_ref import rel_err
from enginesmith.runtime.parallel.pipeline import MicroBatch, run_layers
from enginesmith.runtime.fast.prefill_graphs import GraphedPrefill
from enginesmith.runtime.fast.prefill_layers import PrefillLayers
from enginesmith.runtime.model.random_model import LLAMA_3_8B, TINY_LLAMA, checkpoint_config, random_rank_model

RUNNERS = ("graphed", "compiled", "eager")


def measure(fn, device: torch.device, reps: int = 5) -> tuple[float, float]:
    """(wall ms, host ms), medians over `reps` calls after 3 warm-ups."""
    for _ in range(3):
        fn()
    walls, hosts = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _sync(device)
        walls.append(1e3 * (time.perf_counter() - t0))
        hosts.append(1e3 * (t1 - t0))
    return statistics.median(walls), statistics.median(hosts)


def step(n_tokens: int, seq_len: int, hidden_size: int, device, dtype) -> tuple[torch.Tensor, MicroBatch]:
    per = max(1, n_tokens // seq_len)
    length = n_tokens // per
    positions = torch.arange(length, device=device).repeat(per)
    hidden = torch.randn(per * length, hidden_size, device=device, dtype=dtype) * 0.02
    mb = MicroBatch(torch.zeros(per * length, dtype=torch.long, device=device), positions,
                    torch.arange(per, device=device) * length + length - 1, DenseCausalAttention([length] * per))
    return hidden, mb


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", default="8192,1024,256,100", help="step sizes (tokens per step)")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke test of the code paths")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    device = torch.device("cpu" if a.tiny else "cuda")
    shape, dtype = (TINY_LLAMA, "float32") if a.tiny else (LLAMA_3_8B, "bfloat16")
    cfg = checkpoint_config(shape, num_layers=None if a.tiny else a.layers, dtype=dtype)
    model = random_rank_model(cfg, 0, device=device, seed=0)
    regions = PrefillLayers(compile=not a.tiny)
    graphed = GraphedPrefill(regions)
    runners = {"graphed": graphed, "compiled": regions, "eager": run_layers}
    seq_len = 8 if a.tiny else 512
    res = dict(card=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
               model=dict(shape="tiny" if a.tiny else "llama-3-8b", layers=cfg.num_hidden_layers, dtype=dtype),
               seq_len=seq_len, steps={})
    with torch.inference_mode():
        for n in (int(t) for t in a.tokens.split(",")):
            hidden, mb = step(n, seq_len, cfg.hidden_size, device, model.dtype)
            _sync(device)
            t0 = time.perf_counter()
            out = graphed(model, None, hidden, mb)  # first call at this size: capture (and compile, at the first)
            _sync(device)
            row = dict(tokens=hidden.shape[0], first_graphed_call_s=time.perf_counter() - t0)
            for name, runner in runners.items():
                wall, host = measure(lambda r=runner, h=hidden, b=mb: r(model, None, h, b), device)
                row[name] = dict(wall_ms=wall, host_ms=host)
            row["rel_err_vs_compiled"] = rel_err(out, regions(model, None, hidden, mb))
            row["rel_err_vs_eager"] = rel_err(out, run_layers(model, None, hidden, mb))
            res["steps"][str(n)] = row
    res["status"] = graphed.status()
    if device.type == "cuda":
        res["memory_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
    print(table(res))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if a.tiny else res["card"].split()[-1].lower()
    (out / f"prefill-layers-{slug}.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def table(res: dict) -> str:
    lines = [f"{res['model']['layers']} layers of {res['model']['shape']} on {res['card']}: wall / host ms per step",
             f"{'tokens':>7} " + " ".join(f"{name:>17}" for name in RUNNERS)
             + f" {'capture s':>10} {'err vs compiled':>16}"]
    for row in res["steps"].values():
        cells = " ".join(f"{row[k]['wall_ms']:8.2f}/{row[k]['host_ms']:<8.2f}" for k in RUNNERS)
        lines.append(f"{row['tokens']:>7} {cells} {row['first_graphed_call_s']:>10.2f} "
                     f"{row['rel_err_vs_compiled']:>16.2e}")
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
