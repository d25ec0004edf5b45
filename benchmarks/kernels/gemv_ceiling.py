"""How close can batch-1 decode get to the HBM roofline on this card? A diagnostic for benchmarks/runtime.py.

Replays, in one CUDA graph, only the weight reads of a Llama-3-8B-shaped decode step (every layer's
qkv, o, gate, up and down GEMVs, then lm_head) with nothing else, and reports the bandwidth they reach
next to a plain device copy. Variants: gate and up as two GEMVs vs one fused [2I, H] GEMV.
Usage: python -m benchmarks.kernels.gemv_ceiling [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.kernels.graph_timing import time_graph

HID, INTER, V, L, NQ, NKV, D = 4096, 14336, 128256, 32, 32, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, generator=gen) * 0.02

    layers = [dict(qkv=w((NQ + 2 * NKV) * D, HID), o=w(HID, NQ * D), gate=w(INTER, HID), up=w(INTER, HID),
                   down=w(HID, INTER)) for _ in range(L)]
    for lw in layers:
        lw["gate_up"] = torch.cat([lw["gate"], lw["up"]])
    head = w(V, HID)
    x = torch.randn(1, HID, device=dev, dtype=dt, generator=gen)
    weight_bytes = sum(lw[k].numel() for lw in layers for k in ("qkv", "o", "gate", "up", "down")) * 2
    weight_bytes += head.numel() * 2

    def step(fused: bool):
        def run():
            h = x
            for lw in layers:
                F.linear(h, lw["qkv"])
                h = F.linear(torch.zeros(1, NQ * D, device=dev, dtype=dt), lw["o"]) + h
                if fused:
                    gu = F.linear(h, lw["gate_up"])
                    m = F.silu(gu[:, :INTER]) * gu[:, INTER:]
                else:
                    m = F.silu(F.linear(h, lw["gate"])) * F.linear(h, lw["up"])
                h = F.linear(m, lw["down"]) + h
            F.linear(h, head)
        return run

    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = time_graph(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() / copy_ms / 1e6
    rows = {"copy_gbps": copy_gbps, "weight_bytes": weight_bytes, "card": torch.cuda.get_device_name()}
    for name, fused in (("separate_gate_up", False), ("fused_gate_up", True)):
        ms = time_graph(step(fused))
        gbps = weight_bytes / ms / 1e6
        rows[name] = {"ms": ms, "gbps": gbps, "pct_of_copy": 100 * gbps / copy_gbps}
    print(f"{'variant':<20} {'ms/token':>9} {'GB/s':>8} {'% of copy':>9}")
    for name in ("separate_gate_up", "fused_gate_up"):
        r = rows[name]
        print(f"{name:<20} {r['ms']:>9.3f} {r['gbps']:>8.0f} {r['pct_of_copy']:>9.1f}")
    print(f"copy {copy_gbps:.0f} GB/s (read+write)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = rows["card"].split()[-1].lower()
    (out / f"gemv-ceiling-{card}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
