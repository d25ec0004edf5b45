"""The MoE experts of a multi-token decode step: Triton grouped rows kernels vs torch's grouped GEMM.

Mixtral-8x7B's expert projections at tp 1 and 2 (moe_tp_size 2 halves each expert's intermediate size) for a
decode step of --tokens tokens routed top-2 over 8 experts at random (fixed seed): the fused up/gate + SwiGLU and
the down projection through runtime/kernels/triton_moe_rows.py over a grid of launch configs, and through
torch._grouped_mm (plus PyTorch's SwiGLU) as runtime/decode_layers.moe_mlp ran them before. Each timing is a CUDA
graph replay (median); TB/s counts the bytes of the experts the step touches. Writes moe-rows-<card>.json with a
"best" table in the format ENGINESMITH_MOE_ROWS_CONFIGS reads.
Usage: python -m benchmarks.kernels.moe_rows [--tokens 32] [--configs sweep|tuned] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from benchmarks.kernels.graph_timing import time_graph
from benchmarks.runtime_hw import card_slug
from enginesmith.runtime.kernels.gemv_ref import check_tol, rel_err
from enginesmith.runtime.model.layers import swiglu
from enginesmith.runtime.kernels.triton_moe_rows import DEFAULT, TUNED, RowsConfig, grouped, grouped_swiglu, shape_key

HID, INTER, EXPERTS, TOP_K = 4096, 14336, 8, 2
CONFIGS = [RowsConfig(bn, bk, w, s) for bn, bk, w, s in itertools.product((32, 64, 128), (64, 128, 256), (4, 8),
                                                                           (3, 4))
           if not (bn == 128 and bk == 256)]


def _routed(tokens: int, device) -> tuple[torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(tokens)
    choice = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
    counts = torch.bincount(choice.flatten(), minlength=EXPERTS)
    return counts.cumsum(0).to(torch.int32).to(device), counts.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--configs", choices=("sweep", "tuned"), default="sweep",
                    help="the whole grid, or only the tuned table's configs and the default (a quick re-check)")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    offs, counts = _routed(a.tokens, dev)
    touched = sum(c > 0 for c in counts)
    rows = a.tokens * TOP_K
    res: dict = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, tokens=a.tokens, top_k=TOP_K,
                     experts=EXPERTS, rows_per_expert=counts, shapes={}, best={})
    configs = CONFIGS if a.configs == "sweep" else sorted(set(TUNED.values()) | {DEFAULT}, key=RowsConfig.key)
    for tp in (1, 2):
        inter = INTER // tp
        fc = torch.randn(EXPERTS, 2 * inter, HID, device=dev, dtype=dt) * 0.02
        proj = torch.randn(EXPERTS, HID, inter, device=dev, dtype=dt) * 0.02
        xs = torch.randn(rows, HID, device=dev, dtype=dt)
        act = torch.randn(rows, inter, device=dev, dtype=dt)
        for name, w, n, k, swi in ((f"up tp{tp}", fc, inter, HID, True), (f"down tp{tp}", proj, HID, inter, False)):
            nbytes = w[0].numel() * w.element_size() * touched
            x = xs if swi else act

            def torch_path(x=x, w=w, inter=inter, swi=swi):
                y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
                if swi:
                    up, gate = y.split(inter, dim=-1)
                    return swiglu(gate, up)
                return y

            ref = torch_path()
            fn = grouped_swiglu if swi else grouped
            row = dict(n=n, k=k, swiglu=swi, touched_mb=nbytes / 1e6, grouped_mm_us=1e3 * time_graph(torch_path),
                       configs={})
            for cfg in configs:
                try:
                    out = fn(x, w, offs, a.tokens, cfg)
                    err = rel_err(out, ref)
                    us = 1e3 * time_graph(lambda cfg=cfg, fn=fn, x=x, w=w: fn(x, w, offs, a.tokens, cfg))
                except Exception as e:  # a config the compiler refuses (shared memory): recorded, skipped
                    row["configs"][cfg.key()] = dict(error=f"{type(e).__name__}: {str(e)[:120]}")
                    continue
                row["configs"][cfg.key()] = dict(us=us, tb_s=nbytes / us / 1e6, rel_err=err)
            ok = {key: v for key, v in row["configs"].items() if "us" in v and v["rel_err"] < check_tol(dt)}
            best = min(ok, key=lambda key: ok[key]["us"])
            cfg = next(c for c in configs if c.key() == best)
            row |= dict(best=best, best_us=ok[best]["us"], best_tb_s=ok[best]["tb_s"],
                        grouped_mm_tb_s=nbytes / row["grouped_mm_us"] / 1e6,
                        speedup=row["grouped_mm_us"] / ok[best]["us"])
            res["shapes"][name] = row
            res["best"][shape_key(n, k, swi)] = dict(block_n=cfg.block_n, block_k=cfg.block_k,
                                                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            print(f"{name:10s} {nbytes / 1e6:8.1f} MB  grouped_mm {row['grouped_mm_us']:8.1f} us "
                  f"({row['grouped_mm_tb_s']:.2f} TB/s)  rows kernel {row['best_us']:8.1f} us "
                  f"({row['best_tb_s']:.2f} TB/s, {best})  {row['speedup']:.2f}x", flush=True)
        del fc, proj
    out = Path(a.out)
    if out.suffix != ".json":
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"moe-rows-{card_slug(torch.cuda.get_device_name())}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
