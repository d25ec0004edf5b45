"""The TP exchange (runtime/parallel/tp_exchange.py) against the collective path on 2 GPUs, teacher-forced.

Two ranks (NCCL, the one-shot symmetric-memory all-reduce on), a random Llama-3-8B-shaped model trimmed to
--layers layers. The decoders (collectives; the exchange fused into the GEMVs; the exchange as a kernel per
point, ENGINESMITH_TP_EXCHANGE=kernel's mode; the residual GEMVs storing into the slots and a kernel per point
summing them, =split) get the same 16 tokens at the same positions; the table gives
the largest logit difference per step against the collectives (0.0: bit for bit) and whether the argmax
agrees, then each path's ms per step over 64 greedy steps with the token fed on the GPU, and how many poll
rounds the exchange's consumers waited.
Needs 2 CUDA GPUs with peer access (nvidia-h100-x2).
Usage: python -m benchmarks.kernels.tp_exchange_check [--layers 32] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from benchmarks.runtime import write_atomic
from benchmarks.runtime_parallel import _join, _need_gpus, _spawn
from enginesmith.runtime.model.random_model import LLAMA_3_8B, checkpoint_config, random_rank_model

PROMPT, FORCED, TIMED = 64, 16, 64
PATHS = (("collectives", None), ("exchange", "fused"), ("kernel", "kernel"), ("split", "split"))
"""The decoders compared: (name, TPExchange.mode or None for the one-shot all-reduce)."""


def _rank(rank: int, world: int, port: int, p: dict) -> dict | None:
    import torch.distributed as dist

    from benchmarks.runtime_decode import greedy_batch, make_cache
    from enginesmith.runtime.fast.fast_decode import FastDecoder
    from enginesmith.runtime.model.paged_attention import SeqSpan
    from enginesmith.runtime.model.plain_step import plain_forward
    from enginesmith.runtime.parallel.tp_exchange import for_model

    device, groups = _join(rank, world, port, p, tp_size=world, pp_size=1)
    cfg = checkpoint_config(LLAMA_3_8B, num_layers=p["layers"], dtype="bfloat16", tp_size=world)
    model = random_rank_model(cfg, rank, device=device, seed=0)
    groups.enable_fast_all_reduce(cfg.hidden_size * 2, model.dtype, device)
    ex = for_model(groups, model, device)
    total = PROMPT + FORCED + TIMED + 1
    cache = make_cache(model, total, 32)
    cache.reserve(0, total)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT,), generator=gen).tolist()
    forced = torch.randint(0, cfg.vocab_size, (FORCED,), generator=gen).tolist()
    first = int(plain_forward(model, cache, [SeqSpan(0, 0, PROMPT)], prompt, groups.all_reduce_tp,
                              groups.gather_tp_last_dim)[0].argmax())
    out: dict = dict(exchange=ex.status(), layers=p["layers"], card=torch.cuda.get_device_name(device))
    logits = {}
    for name, mode in PATHS:
        if mode is not None:
            if not ex.enabled:
                continue
            ex.mode = mode
        if rank == 0:
            print(f"  {name}", flush=True)
        dec = FastDecoder(model, cache, max_batch_size=1, max_seq_len=total, reduce=groups.all_reduce_tp,
                          gather=groups.gather_tp_last_dim, exchange=ex if mode else None)
        logits[name] = [dec.decode([0], [t], [PROMPT + i]).float().cpu() for i, t in enumerate(forced)]
        _, secs = greedy_batch(dec, [first], PROMPT + FORCED, TIMED, device, on_device=True)
        out[f"{name}_ms_per_step"] = 1e3 * secs / TIMED
        out[f"{name}_path"] = dec.status()["gemv"]
    for name in ("exchange", "kernel", "split"):
        if name in logits:
            pairs = list(zip(logits["collectives"], logits[name], strict=True))
            key = "" if name == "exchange" else f"_{name}"
            out[f"max_abs_logit_diff_per_step{key}"] = [float((a - b).abs().max()) for a, b in pairs]
            out[f"argmax_agrees_per_step{key}"] = [int(a.argmax()) == int(b.argmax()) for a, b in pairs]
    out["exchange_after"] = ex.status()
    try:
        ex.check_error()
    except RuntimeError as e:
        out["exchange_error"] = str(e)
    dist.destroy_process_group()
    return out if rank == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels.tp_exchange_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="Llama-3-8B layers to keep (32: the whole model)")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tp_exchange_check needs 2 CUDA GPUs with peer access (the exchange lives in symmetric "
                         "memory); this machine has none")
    _need_gpus(True, 2)
    os.environ["ENGINESMITH_TP_EXCHANGE"] = "1"  # the spawned ranks read it when they set the exchange up
    r = _spawn(_rank, 2, dict(cuda=True, layers=args.layers), timeout_s=300)
    print(f"{r['card']} x 2, {r['layers']} layers; exchange: {r['exchange']}")
    for key, what in (("", "exchange (fused)"), ("_kernel", "exchange kernels"), ("_split", "exchange split")):
        diffs = r.get(f"max_abs_logit_diff_per_step{key}")
        if diffs is not None:
            print(f"{what}: max |logit difference| per step vs the collectives: {diffs} "
                  f"({'bit for bit' if not any(diffs) else 'DIFFERENT'}); argmax agrees "
                  f"{sum(r[f'argmax_agrees_per_step{key}'])}/{len(diffs)}")
    times = ", ".join(f"{n} {r[f'{n}_ms_per_step']:.3f}" for n, _ in PATHS if f"{n}_ms_per_step" in r)
    print(f"ms per step (token fed on the GPU): {times}; poll rounds waited "
          f"{r['exchange_after'].get('poll_rounds_waited')}; {r.get('exchange_error', 'no poll gave up')}")
    if args.out:
        write_atomic(Path(args.out), json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
