"""The sections of benchmarks/runtime.py: sizes for the real run and for --tiny, and what each records.

Each function takes the Bench (args, device, results, progress, partial writes) and stores its dict
under its own name in the results.
"""

from __future__ import annotations

import torch

from benchmarks import runtime_decode, runtime_hw, runtime_serving
from enginesmith.runtime.model.random_model import (LLAMA_3_8B, MIXTRAL_8X7B, TINY_LLAMA, TINY_MIXTRAL,
                                                    checkpoint_config, random_rank_model)


def _dtype(bench) -> torch.dtype:
    return torch.bfloat16 if bench.device.type == "cuda" else torch.float32


def _model(bench, shape: dict, num_layers: int | None = None):
    cfg = checkpoint_config(shape, num_layers=num_layers, dtype=str(_dtype(bench)).removeprefix("torch."))
    bench.progress(f"building a random {cfg.architecture} ({cfg.num_hidden_layers} layers, {cfg.dtype})")
    return random_rank_model(cfg, device=bench.device, seed=0)


def hw(bench) -> None:
    bench.results["hw"] = runtime_hw.run(bench.device, bench.args.tiny)
    h = bench.results["hw"]
    bench.progress(f"copy {h['copy_gbps']:.0f} GB/s, matmul {h['matmul_tflops']:.1f} TFLOP/s")


BASELINES = dict(no_pdl=dict(pdl=False), cublas_regions=dict(gemv=False))
"""Batch-1 decode paths timed after the fast one in the same run: fused GEMVs launched without programmatic
dependent launch (the previous session's path) and the cuBLAS + compiled regions path."""


def _decode(bench, name: str, shape: dict, num_layers: int | None, n_fast: int, n_plain: int) -> None:
    tiny = bench.args.tiny
    model = _model(bench, shape, num_layers)
    on_gpu = bench.device.type == "cuda" and bench.decoder_options().get("gemv") is None
    out = runtime_decode.run(
        model, copy_gbps=bench.copy_gbps(), prompt_len=16 if tiny else 512, n_fast=12 if tiny else n_fast,
        n_plain=6 if tiny else n_plain, tokens_per_block=4 if tiny else 32, decoder_options=bench.decoder_options(),
        progress=bench.progress, baselines=BASELINES if on_gpu else None)
    bench.results[name] = dict(model=model.cfg.architecture) | out
    f = out["fast"]
    bench.progress(f"{name}: fast {f['tok_s']:.1f} tok/s = {f['pct_roofline']:.1f}% of roofline "
                   f"{out['roofline_tok_s']:.1f}; plain {out['plain']['tok_s']:.1f} tok/s")


def decode(bench) -> None:
    _decode(bench, "decode", TINY_LLAMA if bench.args.tiny else LLAMA_3_8B, None, n_fast=256, n_plain=32)
    bench.results["decode"]["target_pct_roofline"] = 80.0


def moe(bench) -> None:
    layers = None if bench.args.tiny else bench.args.moe_layers
    _decode(bench, "moe", TINY_MIXTRAL if bench.args.tiny else MIXTRAL_8X7B, layers, n_fast=128, n_plain=16)


def serving(bench) -> None:
    tiny = bench.args.tiny
    model = _model(bench, TINY_LLAMA if tiny else LLAMA_3_8B)
    budget = bench.args.hf_budget_s
    bench.results["serving"] = runtime_serving.run(
        model, n_requests=bench.args.requests or (12 if tiny else 256), isl=(4, 24) if tiny else (128, 2048),
        osl=(2, 10) if tiny else (64, 512), seed=0, max_batch_size=bench.args.max_batch_size or (4 if tiny else 64),
        max_num_tokens=64 if tiny else 8192, tokens_per_block=4 if tiny else 32, hf_budget_s=budget,
        cb_budget_s=budget, cb_options=dict(num_blocks=64, max_batch_tokens=128) if tiny else None,
        decoder_options=bench.decoder_options(), progress=bench.progress,
        partial=lambda d: bench.partial("serving", d))


def tp(bench) -> None:
    from benchmarks import runtime_parallel

    bench.results["tp"] = runtime_parallel.tp_section(bench)


def pp(bench) -> None:
    from benchmarks import runtime_parallel

    bench.results["pp"] = runtime_parallel.pp_section(bench)
