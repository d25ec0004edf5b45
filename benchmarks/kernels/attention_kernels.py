"""Split-KV decode attention (runtime/kernels/triton_decode_attention.py) over its min_chunk, per batch and context.

Llama-3-8B heads (32 query, 8 KV, d=128), bf16, paged cache of 32-token blocks with shuffled tables.
Each timing: one CUDA graph of LAYERS attention calls over distinct cache layers, each after a 256 MB
write that evicts the L2 (as a decode step's weight reads do), minus the same graph without the attention,
median of replays, per call; next to the bytes of K/V each call must read at the measured copy bandwidth.

Usage: python -m benchmarks.kernels.attention_kernels [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.kernels.graph_timing import time_graph
from benchmarks.runtime_hw import card_slug
from enginesmith.runtime.kernels.triton_decode_attention import TritonDecodeAttention

NQ, NKV, D, TPB, LAYERS = 32, 8, 128, 32, 8
MIN_CHUNKS = (64, 128, 256, 512)


def bench_case(batch: int, ctx: int, flush: torch.Tensor, gen: torch.Generator) -> dict:
    dev, dt = "cuda", torch.bfloat16
    per_row = -(-ctx // TPB)
    blocks = batch * per_row
    ks = [torch.randn(blocks, TPB, NKV, D, device=dev, dtype=dt, generator=gen) for _ in range(LAYERS)]
    vs = [torch.randn(blocks, TPB, NKV, D, device=dev, dtype=dt, generator=gen) for _ in range(LAYERS)]
    table = torch.randperm(blocks, device=dev, generator=gen).view(batch, per_row)
    lens = torch.full((batch,), ctx, device=dev)
    q = torch.randn(batch, NQ, D, device=dev, dtype=dt, generator=gen)
    kv_bytes = 2 * batch * ctx * NKV * D * 2

    def flush_only():
        for _ in range(LAYERS):
            flush.add_(1)

    base = time_graph(flush_only)
    out = dict(batch=batch, ctx=ctx, kv_bytes=kv_bytes, min_chunk={})
    ref = None
    for mc in MIN_CHUNKS:
        attn = TritonDecodeAttention(NQ, NKV, D, dt, batch, dev, min_chunk=mc)
        max_len = per_row * TPB
        res = attn(q, ks[0], vs[0], table, lens, max_len).float()
        ref = res if ref is None else ref
        err = float((res - ref).norm() / ref.norm())

        def run(attn=attn, max_len=max_len):
            for k, v in zip(ks, vs, strict=True):
                flush.add_(1)
                attn(q, k, v, table, lens, max_len)

        us = 1e3 * (time_graph(run) - base) / LAYERS
        out["min_chunk"][mc] = dict(us=us, gbps=kv_bytes / us / 1e3, splits=attn.splits(batch, max_len),
                                    rel_err_vs_first=err)
    best = min(out["min_chunk"], key=lambda m: out["min_chunk"][m]["us"])
    out["best"] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    flush = torch.zeros(64 << 20, device="cuda")  # 256 MB
    t0, rows = time.perf_counter(), []
    for batch, ctx in ((1, 640), (1, 2048), (1, 8192), (32, 640), (32, 2048)):
        rows.append(bench_case(batch, ctx, flush, gen))
        torch.cuda.empty_cache()
        r = rows[-1]
        print(f"[{time.perf_counter() - t0:5.1f}s] batch {batch} ctx {ctx}: " + ", ".join(
            f"{m}: {v['us']:.1f} us" for m, v in r["min_chunk"].items()), flush=True)
    slug = card_slug(card)
    out = Path(args.out)
    out = out / f"attention-kernels-{slug}.json" if out.is_dir() or not out.suffix else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(card=card, layers=LAYERS, rows=rows), indent=2))
    print(f"\n{'batch':>5} {'ctx':>5} " + " ".join(f"{'mc ' + str(m) + ' us':>11}" for m in MIN_CHUNKS) + "  best")
    for r in rows:
        print(f"{r['batch']:>5} {r['ctx']:>5} " + " ".join(f"{r['min_chunk'][m]['us']:>11.1f}" for m in MIN_CHUNKS)
              + f"  {r['best']}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
