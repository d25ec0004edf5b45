"""Batch-1 decode GEMVs: the fused Triton kernels (runtime/kernels/triton_gemv.py) over launch configs vs cuBLAS.

For every projection of a Llama-3-8B decode step (tp=1 and the tp=2 shards): cuBLAS's plain GEMV
(F.linear only, without the norm / SiLU / residual kernels the unfused path adds) next to the fused
kernel in each config. Each timing is one CUDA graph replaying the projection over COPIES distinct
weight tensors (as consecutive layers do, so the L2 cache holds none of them), median of replays, per
launch. Every config is first checked against runtime/kernels/gemv_ref.py. The best config per shape goes to
`best` in the JSON, which `ENGINESMITH_GEMV_CONFIGS=<file>` makes the runtime use.

--rope times the qkv projection as the decode step runs it (runtime/triton_gemv.qkv_rope_gemv: RMSNorm, qkv,
rotary and the KV-cache write in one kernel) over the same configs, next to the plain fused GEMV in each
config, at tp 1 and 2 (gemv-rope-<card>.json; its `best` entries are keyed "rope-<n>x<k>", which
qkv_rope_gemv looks up first).

--rows 8,32 does the same for the small-batch kernels (runtime/kernels/triton_rows.py) at those row counts against
cuBLAS's GEMM of as many rows (gemm-rows-<card>.json, `ENGINESMITH_ROWS_CONFIGS=<file>`).

Usage: python -m benchmarks.kernels.gemv_kernels [--out DIR] [--quick] [--rows M[,M...] | --rope]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from benchmarks.kernels.graph_timing import time_graph
from benchmarks.runtime_hw import card_slug
from enginesmith.runtime.kernels import triton_rows
from enginesmith.runtime.kernels.gemv_ref import gemv_ref, rel_err
from enginesmith.runtime.kernels.triton_gemv import GemvConfig, config_for, gemv, qkv_rope_gemv, shape_key

HID, INTER, VOCAB, NQ, NKV, D = 4096, 14336, 128256, 32, 8, 128
COPIES = 16


def shapes(tp: int) -> list[dict]:
    """(name, outputs n, inputs k, fused options) of one decode step's projections on one of tp ranks."""
    return [
        dict(name=f"qkv tp{tp}", n=(NQ + 2 * NKV) * D // tp, k=HID, norm=True),
        dict(name=f"o_proj tp{tp}", n=HID, k=NQ * D // tp, residual=True),
        dict(name=f"gate_up tp{tp}", n=INTER // tp, k=HID, norm=True, swiglu=True),
        dict(name=f"down tp{tp}", n=HID, k=INTER // tp, residual=True),
        dict(name=f"lm_head tp{tp}", n=VOCAB // tp, k=HID, norm=True, out_f32=True, copies=4),
    ]


def configs(quick: bool) -> list[GemvConfig]:
    """Triton does not software-pipeline these loads (num_stages 1 and 3 timed the same on an H200): the
    bytes in flight per program come from the tile and from prefetching the next tile by hand. (A tensor-core
    variant, x in row 0 of a 16-row tile so Triton pipelines its loads, lost on every shape, 1.05x to 3.4x
    slower than these, and was dropped.)"""
    tiles = [(4, 1024), (8, 256)] if quick else [
        (2, 2048), (4, 1024), (4, 2048), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512)]
    return [GemvConfig(n, k, w, 1, prefetch=p) for (n, k), w, p in itertools.product(tiles, (4, 8), (False, True))]


def rows_configs(quick: bool) -> list[triton_rows.RowsConfig]:
    """The small-batch kernels are software-pipelined by Triton (num_stages): tiles x pipeline depths."""
    tiles = [(32, 128), (64, 128)] if quick else [(16, 256), (32, 128), (32, 256), (64, 64), (64, 128), (128, 64)]
    return [triton_rows.RowsConfig(n, k, 4, st) for (n, k), st in itertools.product(tiles, (3, 5))]


def bench_shape(spec: dict, cfgs: list, gen: torch.Generator, m: int = 1) -> dict:
    """m = 1: the GEMV kernels (GemvConfig); m > 1: the rows kernels (RowsConfig) on m rows."""
    n, k, copies = spec["n"], spec["k"], spec.get("copies", COPIES)
    kernel, key = (gemv, shape_key(n, k, spec.get("swiglu", False))) if m == 1 else (
        triton_rows.gemm_rows, triton_rows.shape_key(m, n, k, spec.get("swiglu", False)))
    swiglu = spec.get("swiglu", False)
    rows = 2 * n if swiglu else n
    dev, dt = "cuda", torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dt)

    ws = [rnd(rows, k, scale=0.02) for _ in range(copies)]
    x = rnd(m, k)
    kw = dict(norm=1 + 0.1 * rnd(k) if spec.get("norm") else None, swiglu=swiglu, eps=1e-5,
              residual=rnd(m, n) if spec.get("residual") else None, out_f32=spec.get("out_f32", False))
    ref = gemv_ref(x, ws[0], **kw).float()
    out = torch.empty(m, n, device=dev, dtype=torch.float32 if kw["out_f32"] else dt)
    lin = torch.empty(m, rows, device=dev, dtype=dt)
    bytes_ = rows * k * 2

    def cublas():
        for w in ws:
            torch.mm(x, w.t(), out=lin)

    t_cublas = time_graph(cublas) / copies
    res = dict(name=spec["name"], key=key, m=m, n=n, k=k, weight_bytes=bytes_,
               cublas_us=1e3 * t_cublas, cublas_gbps=bytes_ / t_cublas / 1e6, configs={})
    for cfg in cfgs:
        try:
            out.fill_(float("nan"))
            err = rel_err(kernel(x, ws[0], config=cfg, out=out, **kw), ref)
            if not err < 2e-2:
                res["configs"][cfg.key()] = dict(error=f"relative error {err:.3g}")
                continue

            def fused(cfg=cfg):
                for w in ws:
                    kernel(x, w, config=cfg, out=out, **kw)

            t = time_graph(fused) / copies
            res["configs"][cfg.key()] = dict(us=1e3 * t, gbps=bytes_ / t / 1e6, rel_err=err, config=cfg.__dict__)
        except Exception as e:  # e.g. out of shared memory for one tile: record it, try the rest
            res["configs"][cfg.key()] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    if _pick_best(res):
        res["speedup_vs_cublas_gemv"] = t_cublas * 1e3 / res["best_us"]
    ws.clear()
    torch.cuda.empty_cache()
    return res


def _pick_best(res: dict) -> dict:
    """Sets res's best / best_us / best_gbps from its timed configs; returns those configs ({} if none ran)."""
    ok = {c: v for c, v in res["configs"].items() if "us" in v}
    if ok:
        best = min(ok, key=lambda c: ok[c]["us"])
        res.update(best=best, best_us=ok[best]["us"], best_gbps=ok[best]["gbps"])
    return ok


def bench_rope(tp: int, cfgs: list[GemvConfig], gen: torch.Generator) -> dict:
    """The qkv projection of one of tp ranks: qkv_rope_gemv (norm, rotary, KV write) against the unfused
    arithmetic, then per config its time next to the plain fused GEMV's (norm only) in the same config."""
    from enginesmith.runtime.fast.decode_rope_write import rope_cache_write_ref
    from enginesmith.runtime.model.layers import rope_cos_sin

    nq, nkv, n, k = NQ // tp, NKV // tp, (NQ + 2 * NKV) * D // tp, HID
    dev, dt = "cuda", torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dt)

    ws, x, g = [rnd(n, k, scale=0.02) for _ in range(COPIES)], rnd(1, k), 1 + 0.1 * rnd(k)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    cos, sin = rope_cos_sin(torch.tensor([600], device=dev), inv, torch.float32)
    caches = [rnd(64, 32, nkv, D) for _ in range(2)]
    slot = 777  # block 24, token 9 of the 64 x 32-token cache
    slots, src = torch.tensor([slot], device=dev), torch.tensor([0], device=dev)
    ref_caches = [c.clone() for c in caches]
    ref_q = rope_cache_write_ref(gemv_ref(x, ws[0], norm=g, eps=1e-5), cos, sin, *ref_caches, slots, src, nq, nkv, D)
    out = torch.empty(1, n, device=dev, dtype=dt)
    bytes_ = n * k * 2
    res = dict(name=f"qkv+rope tp{tp}", key="rope-" + shape_key(n, k, False), n=n, k=k, weight_bytes=bytes_,
               configs={})
    for cfg in cfgs:
        try:
            q = qkv_rope_gemv(x, ws[0], g, 1e-5, None, cos, sin, slots, *caches, nq, nkv, D, config=cfg)
            err = max(rel_err(q, ref_q), *(rel_err(c.view(-1, nkv, D)[slot], r.view(-1, nkv, D)[slot])
                                           for c, r in zip(caches, ref_caches, strict=True)))
            if not err < 2e-2:
                res["configs"][cfg.key()] = dict(error=f"relative error {err:.3g}")
                continue

            def rope(cfg=cfg):
                for w in ws:
                    qkv_rope_gemv(x, w, g, 1e-5, None, cos, sin, slots, *caches, nq, nkv, D, config=cfg)

            def plain(cfg=cfg):
                for w in ws:
                    gemv(x, w, norm=g, eps=1e-5, config=cfg, out=out)

            t, t_plain = time_graph(rope) / COPIES, time_graph(plain) / COPIES
            res["configs"][cfg.key()] = dict(us=1e3 * t, gbps=bytes_ / t / 1e6, plain_us=1e3 * t_plain, rel_err=err,
                                             config=cfg.__dict__)
        except Exception as e:  # e.g. out of shared memory for one tile: record it, try the rest
            res["configs"][cfg.key()] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    if ok := _pick_best(res):
        res["best_plain"] = min(v["plain_us"] for v in ok.values())
    ws.clear()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="2 tiles instead of 8")
    ap.add_argument("--rows", default="", help="row counts for the small-batch kernels, e.g. 8,32")
    ap.add_argument("--rope", action="store_true", help="the qkv kernel with rotary and the KV write fused")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.rope:
        return main_rope(args, card, gen)
    ms = [int(v) for v in args.rows.split(",") if v] or [1]
    cfgs = rows_configs(args.quick) if ms != [1] else configs(args.quick)
    t0 = time.perf_counter()
    rows = []
    for m, tp in itertools.product(ms, (1, 2)):
        for spec in shapes(tp):
            r = bench_shape(spec | dict(name=f"{spec['name']} m{m}" if m > 1 else spec["name"]), cfgs, gen, m)
            rows.append(r)
            print(f"[{time.perf_counter() - t0:6.1f}s] {r['name']}: cuBLAS {r['cublas_us']:.1f} us "
                  f"({r['cublas_gbps']:.0f} GB/s); fused best {r.get('best')} {r.get('best_us', float('nan')):.1f} us "
                  f"({r.get('best_gbps', float('nan')):.0f} GB/s)", flush=True)
    out = _save(rows, "gemv-kernels" if ms == [1] else "gemm-rows", args.out, card)
    print(f"\n{'shape':<20}{'n x k':>14}{'cuBLAS us':>11}{'GB/s':>7}{'fused us':>10}{'GB/s':>7}  best config")
    for r in rows:
        print(f"{r['name']:<20}{r['n']:>7}x{r['k']:<6}{r['cublas_us']:>11.1f}{r['cublas_gbps']:>7.0f}"
              f"{r.get('best_us', float('nan')):>10.1f}{r.get('best_gbps', float('nan')):>7.0f}  {r.get('best')}")
    print(f"written {out}")


def main_rope(args, card: str, gen: torch.Generator) -> None:
    cfgs = configs(args.quick)
    rows = []
    for tp in (1, 2):
        in_use = config_for((NQ + 2 * NKV) * D // tp, HID, False, rope=True)  # what qkv_rope_gemv picks
        r = bench_rope(tp, cfgs if in_use in cfgs else [*cfgs, in_use], gen)  # timed even when --quick leaves it out
        rows.append(r)
        now = in_use.key()
        cur, nan = r["configs"].get(now, {}), float("nan")
        print(f"{r['name']}: best {r.get('best')} {r.get('best_us', nan):.2f} us ({r.get('best_gbps', nan):.0f} "
              f"GB/s); plain GEMV best {r.get('best_plain', nan):.2f} us; the config in use now {now}: "
              f"{cur.get('us', nan):.2f} us (plain {cur.get('plain_us', nan):.2f})", flush=True)
        for key, v in sorted(r["configs"].items(), key=lambda kv: kv[1].get("us", 1e9))[:8]:
            print(f"    {key:<22} {v.get('us', nan):7.2f} us  plain {v.get('plain_us', nan):7.2f}")
    print(f"written {_save(rows, 'gemv-rope', args.out, card)}")


def _save(rows: list[dict], stem: str, out_arg: str, card: str) -> Path:
    """The sweep's JSON (rows and each shape's best config under `best`) at out_arg, or <stem>-<card>.json in
    that folder; returns the path."""
    result = dict(card=card, torch=torch.__version__, triton=__import__("triton").__version__, copies=COPIES,
                  shapes=rows, best={r["key"]: r["configs"][r["best"]]["config"] for r in rows if "best" in r})
    out = Path(out_arg)
    out = out / f"{stem}-{card_slug(card)}.json" if out.is_dir() or not out.suffix else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


if __name__ == "__main__":
    main()

