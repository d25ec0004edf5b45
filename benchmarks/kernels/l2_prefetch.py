"""Can a TP decode step hide its all-reduce wait behind weight streaming? Prefetch into L2 during a wait.

At tp=2 a Llama-3-8B batch-1 layer waits ~2 x 6.5 us in its all-reduces while HBM idles (issue 6: the
1.7x target needs that time back). This measures the idea on one GPU: a fixed wait (a spin kernel of the
one-shot all-reduce's length) followed by the next projection's fused GEMV (runtime/kernels/triton_gemv.py),
against the same with a prefetch kernel on a parallel branch of the CUDA graph that brings the first P MB
of that projection's weight into L2 during the wait, three ways: "loads" (loads into registers with
evict_last: each program waits for its own loads), "line" (PTX prefetch.global.L2::evict_last, one per
128-byte line, nothing waits), "bulk" (Hopper's cp.async.bulk.prefetch.L2, one per 32 KB).
Saved time per GEMV = serial - overlapped;
the GEMV alone and the wait alone are timed too. Every timing is a CUDA graph over COPIES weight copies
(L2 holds none of them at the start of each), median of replays.
Usage: python -m benchmarks.kernels.l2_prefetch [--out DIR] [--wait-us 6.5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.kernels.graph_timing import time_graph
from benchmarks.runtime_hw import card_slug
from enginesmith.runtime.kernels.triton_gemv import gemv

HID, INTER, NQ, NKV, D = 4096, 14336, 32, 8, 128
SHAPES = {  # the tp=2 projections that follow an all-reduce: gate/up (after o_proj's), qkv (after down's)
    "gate_up tp2": dict(rows=INTER, k=HID, norm=True, swiglu=True, copies=8),
    "qkv tp2": dict(rows=(NQ + 2 * NKV) * D // 2, k=HID, norm=True, copies=16),
}


@triton.jit
def _prefetch_kernel(W, OUT, n, per_prog, BLOCK: tl.constexpr):
    """Read W[pid * per_prog: (pid + 1) * per_prog] once, keeping it in L2 (evict_last); one sum out so the
    loads are not dropped."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, per_prog, BLOCK):
        offs = pid.to(tl.int64) * per_prog + i + tl.arange(0, BLOCK)
        acc += tl.load(W + offs, mask=offs < n, other=0.0, eviction_policy="evict_last").to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc, 0))


@triton.jit
def _asm_prefetch_kernel(W, n, per_prog, STEP: tl.constexpr, BLOCK: tl.constexpr, BULK: tl.constexpr):
    """This program's share into L2 without waiting for it: BLOCK addresses STEP elements apart per iteration,
    each a PTX prefetch.global.L2::evict_last of its 128-byte line (STEP 64), or with BULK a Hopper
    cp.async.bulk.prefetch.L2 of 32 KB (STEP 16384)."""
    pid = tl.program_id(0)
    end = tl.minimum(pid.to(tl.int64) * per_prog + per_prog, n)
    for i in range(0, per_prog, BLOCK * STEP):
        offs = pid.to(tl.int64) * per_prog + i + tl.arange(0, BLOCK) * STEP
        if BULK:
            tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 32768;\n\tmov.u32 $0, 0;", "=r,l",
                                      [W + tl.minimum(offs, end - STEP)], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                      [W + tl.minimum(offs, end - 1)], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(w: torch.Tensor, nbytes: int, programs: int, out: torch.Tensor, how: str = "loads") -> None:
    n = min(w.numel(), nbytes // w.element_size())
    per = triton.cdiv(triton.cdiv(n, programs), 1 << 14) * (1 << 14)
    if how == "loads":
        _prefetch_kernel[(programs,)](w, out, n, per, BLOCK=4096, num_warps=8)
    elif how == "line":
        _asm_prefetch_kernel[(programs,)](w, n, per, STEP=64, BLOCK=256, BULK=False, num_warps=8)
    else:
        _asm_prefetch_kernel[(programs,)](w, n, per, STEP=16384, BLOCK=32, BULK=True, num_warps=1)


VARIANTS = {"loads": [66], "line": [4, 16, 66], "bulk": [1, 4, 16]}
"""Prefetch kernel -> program counts tried."""


def spin_cycles(wait_us: float) -> int:
    """torch.cuda._sleep cycles that take wait_us inside a graph on this card (measured, not the clock's
    nominal rate)."""
    probe = 20000
    us = 1e3 * time_graph(lambda: [torch.cuda._sleep(probe) for _ in range(10)]) / 10
    return max(1, int(probe * wait_us / us))


def bench(name: str, spec: dict, cycles: int, sizes_mb: list[int]) -> dict:
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    copies = spec["copies"]
    ws = [(torch.randn(spec["rows"], spec["k"], device=dev, generator=gen) * 0.02).to(dt) for _ in range(copies)]
    x = torch.randn(1, spec["k"], device=dev, generator=gen).to(dt)
    norm = torch.ones(spec["k"], device=dev, dtype=dt)
    n_out = spec["rows"] // 2 if spec.get("swiglu") else spec["rows"]
    out = torch.empty(1, n_out, device=dev, dtype=dt)
    sink = torch.empty(1024, device=dev)
    kw = dict(norm=norm if spec.get("norm") else None, swiglu=spec.get("swiglu", False), out=out)

    def alone():
        for w in ws:
            gemv(x, w, **kw)

    def serial():
        for w in ws:
            torch.cuda._sleep(cycles)
            gemv(x, w, **kw)

    def wait_only():
        for _ in ws:
            torch.cuda._sleep(cycles)

    side = torch.cuda.Stream()

    def overlapped(nbytes: int, progs: int, how: str):
        def fn():
            main = torch.cuda.current_stream()
            for w in ws:
                side.wait_stream(main)  # the fork: the prefetch starts with the wait
                with torch.cuda.stream(side):
                    prefetch(w, nbytes, progs, sink, how)
                torch.cuda._sleep(cycles)
                main.wait_stream(side)  # the join: the GEMV after both
                gemv(x, w, **kw)
        return fn

    res = dict(name=name, weight_mb=ws[0].numel() * 2 / 1e6, copies=copies,
               gemv_us=1e3 * time_graph(alone) / copies, wait_us=1e3 * time_graph(wait_only) / copies,
               serial_us=1e3 * time_graph(serial) / copies, overlapped={})
    for how, progs_list in VARIANTS.items():
        for mb in sizes_mb:
            if mb * 1e6 > ws[0].numel() * 2 * 1.001:
                continue
            for progs in progs_list:
                key = f"{how}-{mb}MB-{progs}p"
                try:
                    t = 1e3 * time_graph(overlapped(int(mb * 1e6), progs, how)) / copies
                except Exception as e:  # e.g. an instruction this card or PTX version lacks: record, go on
                    res["overlapped"][key] = dict(how=how, error=f"{type(e).__name__}: {str(e)[:300]}")
                    break
                res["overlapped"][key] = dict(how=how, mb=mb, programs=progs, us=t, saved_us=res["serial_us"] - t)
    ok = [v for v in res["overlapped"].values() if "us" in v]
    best = min(ok, key=lambda v: v["us"]) if ok else None
    res["best"] = best
    ws.clear()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--wait-us", type=float, default=6.5, help="the all-reduce's length (one-shot, 8 KB, tp=2)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    cycles = spin_cycles(a.wait_us)
    rows = [bench(name, spec, cycles, [8, 16, 24, 32]) for name, spec in SHAPES.items()]
    card = torch.cuda.get_device_name()
    print(f"{'projection':<13}{'MB':>6}{'GEMV us':>9}{'wait us':>9}{'serial':>8}{'overlap':>9}{'saved':>7}  best")
    for r in rows:
        b = r["best"] or {}
        print(f"{r['name']:<13}{r['weight_mb']:>6.0f}{r['gemv_us']:>9.1f}{r['wait_us']:>9.1f}{r['serial_us']:>8.1f}"
              f"{b.get('us', float('nan')):>9.1f}{b.get('saved_us', float('nan')):>7.1f}  "
              f"{b.get('how')}: {b.get('mb')} MB by {b.get('programs')} programs")
        for key, v in r["overlapped"].items():
            line = f"{v['us']:.1f} us, saved {v['saved_us']:.1f}" if "us" in v else v["error"][:150]
            print(f"    {key:<20} {line}")
    slug = card_slug(card)
    out = Path(a.out)
    out = out / f"l2-prefetch-{slug}.json" if out.is_dir() or not out.suffix else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(card=card, torch=torch.__version__, wait_target_us=a.wait_us, spin_cycles=cycles,
                                   seconds=time.perf_counter() - t0, shapes=rows), indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
