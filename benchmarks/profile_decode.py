"""Where does a batch-1 decode step spend its time? Kernel table of the CUDA-graph decode path.

Builds the random-weight Llama-3-8B-shaped model (bf16), captures the fast decode step, replays it
under torch.profiler and prints the kernels by total time per step (count per step, mean us), so the
fixed per-layer cost next to the GEMVs can be attributed. Writes decode-profile-<card>.json.
--moe profiles the Mixtral-shaped model (8 layers by default) instead (decode-profile-<card>-moe.json).
Usage: python -m benchmarks.profile_decode [--moe] [--layers N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from runtime.fast_decode import FastDecoder
from runtime.kv_cache import PagedKVCache
from runtime.random_model import LLAMA_3_8B, MIXTRAL_8X7B, checkpoint_config, random_rank_model

SEQ = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--moe", action="store_true", help="the Mixtral-8x7B shape (default 8 layers)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    shape, layers = (MIXTRAL_8X7B, a.layers or 8) if a.moe else (LLAMA_3_8B, a.layers)
    cfg = checkpoint_config(shape, num_layers=layers, dtype="bfloat16")
    model = random_rank_model(cfg, device="cuda", seed=0)
    prompt_len, tpb = 512, 32
    cache = PagedKVCache(num_layers=model.num_local_layers, num_kv_heads=model.num_kv_heads,
                         head_size=model.head_size, num_blocks=64, tokens_per_block=tpb, dtype=model.dtype,
                         device="cuda")
    cache.reserve(SEQ, prompt_len + 2 * a.steps + 8)
    dec = FastDecoder(model, cache, max_batch_size=1, max_seq_len=prompt_len + 2 * a.steps + 8)
    pos = prompt_len
    for _ in range(a.steps):  # warm-up: compile + capture
        dec.decode([SEQ], [1], [pos])
        pos += 1
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.steps):
            dec.decode([SEQ], [1], [pos])
            pos += 1
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += 1
            per[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    rows = sorted(((n, c / a.steps, t / a.steps) for n, (c, t) in per.items()), key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    print(f"{'us/step':>9} {'count':>6} {'us each':>8}  kernel   (total {total:.0f} us/step, {dec.status()})")
    for name, count, us in rows[:25]:
        print(f"{us:>9.1f} {count:>6.0f} {us / max(count, 1):>8.2f}  {name[:110]}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name().split()[-1].lower()
    (out / f"decode-profile-{card}{'-moe' if a.moe else ''}.json").write_text(json.dumps(
        dict(card=torch.cuda.get_device_name(), layers=cfg.num_hidden_layers, total_us_per_step=total,
             kernels=[dict(name=n, count_per_step=c, us_per_step=u) for n, c, u in rows]), indent=2) + "\n")


if __name__ == "__main__":
    main()
