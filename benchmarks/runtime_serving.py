"""Offline throughput on mixed-length requests: our in-flight batching engine vs transformers.

All requests arrive at once; throughput is the requested output tokens over the wall time until the
last one finishes. The engine is the served one (runtime/engine/engine.py): decode tokens through its FastDecoder,
prefill chunks through its prefill layers (on CPU the fast path is switched on for the run: eager, no graphs).
transformers' static batches use the engine's max_batch_size, in arrival order.
"""

from __future__ import annotations

import gc
import os
import random
import time
from collections.abc import Callable

import torch

from benchmarks import runtime_hf
from enginesmith.runtime.engine.engine import Engine
from enginesmith.runtime.engine.engine_config import EngineConfig
from enginesmith.runtime.fast.fast_decode import FAST_DECODE_ENV
from enginesmith.runtime.model.model import RankModel
from enginesmith.runtime.engine.request import FinishReason, Request

Progress = Callable[[str], None]


def workload(n: int, isl: tuple[int, int], osl: tuple[int, int], vocab: int, seed: int):
    """n prompts of uniform random length in isl (random token ids) and output lengths in osl."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*isl))] for _ in range(n)]
    return prompts, [rng.randint(*osl) for _ in range(n)]


def run_engine(engine: Engine, prompts: list[list[int]], osls: list[int], progress: Progress) -> dict:
    engine.submit(Request(prompts[0][:16], 4))  # warm-up
    engine.run_until_idle()
    start = last = time.perf_counter()
    finished = 0

    def on_update(update) -> None:
        nonlocal finished, last
        finished += update.finished
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            progress(f"engine: {finished}/{len(prompts)} requests done, {last - start:.0f} s")

    reqs = [Request(p, n, request_id=f"r{i}", on_update=on_update)
            for i, (p, n) in enumerate(zip(prompts, osls, strict=True))]
    _sync(engine.model.device)
    start = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    engine.run_until_idle()
    _sync(engine.model.device)
    elapsed = time.perf_counter() - start
    wrong = [r for r, n in zip(reqs, osls, strict=True)
             if r.finish_reason is not FinishReason.LENGTH or len(r.output) != n]
    if wrong:
        raise RuntimeError(f"{len(wrong)} engine requests ended early or failed, e.g. {wrong[0].request_id}: "
                           f"{wrong[0].finish_reason} {wrong[0].error}")
    tokens = sum(osls)
    return dict(elapsed_s=elapsed, output_tokens=tokens, tok_s=tokens / elapsed)


def run(model: RankModel, *, n_requests: int, isl: tuple[int, int], osl: tuple[int, int], seed: int,
        max_batch_size: int, max_num_tokens: int, tokens_per_block: int, hf_budget_s: float, cb_budget_s: float,
        cb_options: dict | None, decoder_options: dict, progress: Progress, partial: Callable[[dict], None]) -> dict:
    prompts, osls = workload(n_requests, isl, osl, model.cfg.vocab_size, seed)
    out = dict(requests=n_requests, isl=list(isl), osl=list(osl), seed=seed, max_batch_size=max_batch_size,
               input_tokens=sum(map(len, prompts)), output_tokens=sum(osls))
    config = EngineConfig(max_batch_size=max_batch_size, max_input_len=isl[1], max_seq_len=isl[1] + osl[1],
                          max_num_tokens=max_num_tokens, tokens_per_block=tokens_per_block,
                          dtype=str(model.dtype).removeprefix("torch."))
    t0 = time.perf_counter()
    previous = os.environ.get(FAST_DECODE_ENV)
    os.environ[FAST_DECODE_ENV] = "on"  # CPU runs too (on CUDA it is the default)
    try:
        engine = Engine(model, config, decoder_options=decoder_options)
    finally:
        if previous is None:
            os.environ.pop(FAST_DECODE_ENV)
        else:
            os.environ[FAST_DECODE_ENV] = previous
    progress(f"engine ready in {time.perf_counter() - t0:.1f} s ({engine.cache.num_blocks} KV blocks)")
    out["engine"] = run_engine(engine, prompts, osls, progress) | dict(
        setup_s=time.perf_counter() - t0, fast_steps=engine.fast_steps, plain_steps=engine.plain_steps,
        kv_blocks=engine.cache.num_blocks, decoder=engine.fast_decoder.status())
    progress(f"engine: {out['engine']['tok_s']:.0f} tok/s")
    partial(out)
    del engine
    _free()
    hf = runtime_hf.hf_llama_sharing(model)
    try:
        out["hf_static"] = runtime_hf.static_generate(hf, prompts, osls, max_batch_size, hf_budget_s, progress)
    except Exception as e:  # an OOM or API change in the baseline must not lose the engine's numbers
        out["hf_static"] = dict(error=f"{type(e).__name__}: {e}")
    static = out["hf_static"]
    out["speedup_vs_static"] = out["engine"]["tok_s"] / static["tok_s"] if "tok_s" in static else None
    partial(out)
    _free()
    try:
        out["hf_continuous"] = runtime_hf.continuous_batching(hf, prompts, osls, cb_budget_s, progress, cb_options)
    except Exception as e:
        out["hf_continuous"] = dict(error=f"{type(e).__name__}: {e}")
    cb = out["hf_continuous"]
    out["speedup_vs_continuous"] = out["engine"]["tok_s"] / cb["tok_s"] if cb.get("tok_s") else None
    out["target_speedup_vs_static"] = 5.0
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
