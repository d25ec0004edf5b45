"""Which GEMV launch configs make the batch-1 decode step fastest? An A/B inside the CUDA-graph step, one GPU.

A kernel's best config alone (benchmarks/kernels/gemv_kernels.py) need not be its best inside the step, where PDL
lets it start loading weights while the kernel before it finishes. This builds the random-weight
Llama-3-8B-shaped model (bf16; --tp N: rank 0's shards of the tp=N model decoding alone, without its
all-reduces and with its own logits standing in for the gather: timing only), captures one decoder per
variant (each variant overrides entries of runtime/triton_gemv.TUNED while its graph is captured, so the
launches in that graph keep them), and times them in alternating rounds with the next token fed on the
device (no host sync per token): median ms per step per variant.
VARIANT: NAME (the table as it is) or NAME:KEY=CONFIG[,KEY=CONFIG...], KEY a TUNED key ("4096x2048",
"rope-3072x4096", ...), CONFIG as GemvConfig.key() writes it without the stage count ("pf-n4-k2048-w4").
Usage: python -m benchmarks.kernels.step_configs [--tp N] [--layers L] [--rounds R] [--steps S] [--out DIR] VARIANT...
Writes step-configs-<card>[-tpN].json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from benchmarks.runtime import write_atomic
from benchmarks.runtime_hw import card_slug
from enginesmith.runtime.kernels import triton_gemv
from enginesmith.runtime.kernels.triton_gemv import GemvConfig
from enginesmith.runtime.model.random_model import LLAMA_3_8B, checkpoint_config, random_rank_model

PROMPT_LEN = 512
_CONFIG = re.compile(r"^(pf-)?n(\d+)-k(\d+)-w(\d+)$")


def parse_variant(text: str) -> tuple[str, dict[str, GemvConfig]]:
    """"NAME" or "NAME:KEY=CONFIG[,KEY=CONFIG...]" -> (NAME, {KEY: GemvConfig}); ValueError naming the bad part."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r}: no name before ':'")
    overrides = {}
    for part in filter(None, rest.split(",")):
        key, eq, cfg = part.partition("=")
        m = _CONFIG.match(cfg.strip())
        if not eq or not key.strip() or m is None:
            raise ValueError(f"variant {name!r}: {part!r} is not KEY=CONFIG with CONFIG like pf-n4-k2048-w4")
        overrides[key.strip()] = GemvConfig(int(m[2]), int(m[3]), int(m[4]), 1, prefetch=bool(m[1]))
    return name, overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="NAME or NAME:KEY=CONFIG[,KEY=CONFIG...]")
    ap.add_argument("--tp", type=int, default=1, help="time rank 0 of a tp=N model alone (no all-reduce)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timing")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    try:
        variants = [parse_variant(v) for v in a.variants]
    except ValueError as e:
        ap.error(str(e))
    if len({n for n, _ in variants}) != len(variants):
        ap.error("variant names must differ")
    res = run(variants, a.tp, a.layers, a.rounds, a.steps)
    card = torch.cuda.get_device_name()
    res = dict(card=card, tp=a.tp, rank_alone=a.tp > 1, steps=a.steps, rounds=a.rounds, **res)
    base = res["variants"][0]["median_ms"]
    who = f"tp={a.tp} rank 0 alone" if a.tp > 1 else "tp=1"
    print(f"{'variant':<16}{'median ms':>10}{'vs first':>9}  overrides (card {card}, {who})")
    for v in res["variants"]:
        print(f"{v['name']:<16}{v['median_ms']:>10.4f}{v['median_ms'] / base:>9.3f}  {v['overrides']}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-configs-{card_slug(card)}{f'-tp{a.tp}' if a.tp > 1 else ''}.json"
    write_atomic(path, json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")


def run(variants: list[tuple[str, dict[str, GemvConfig]]], tp: int, layers: int | None, rounds: int,
        steps: int) -> dict:
    from benchmarks.kernels.profile_decode import rank_alone_collectives
    from benchmarks.runtime_decode import greedy_batch, make_cache
    from enginesmith.runtime.fast.fast_decode import FastDecoder

    device = torch.device("cuda", 0)
    cfg = checkpoint_config(LLAMA_3_8B, num_layers=layers, dtype="bfloat16", tp_size=tp)
    model = random_rank_model(cfg, 0, device=device, seed=0)
    total = PROMPT_LEN + steps + 8
    cache = make_cache(model, total, 32)
    cache.reserve(0, total)
    kw = dict(zip(("reduce", "gather"), rank_alone_collectives(tp), strict=True)) if tp > 1 else {}
    decoders = []
    for _, overrides in variants:
        dec = FastDecoder(model, cache, max_batch_size=1, max_seq_len=total, compile=False, **kw)
        saved = dict(triton_gemv.TUNED)
        triton_gemv.TUNED.update(overrides)
        try:  # the first steps capture the graph with these configs in its launches
            greedy_batch(dec, [1], PROMPT_LEN, 4, device, on_device=True)
        finally:
            triton_gemv.TUNED.clear()
            triton_gemv.TUNED.update(saved)
        decoders.append(dec)
    times: list[list[float]] = [[] for _ in variants]
    tokens = []
    for _ in range(rounds):
        for i, dec in enumerate(decoders):
            toks, secs = greedy_batch(dec, [1], PROMPT_LEN, steps, device, on_device=True)
            times[i].append(1e3 * secs / steps)
            tokens.append(toks)
    # same_tokens may be False across variants: a config changes the summation order, so the roundings, and a
    # greedy token of the random model can follow
    return dict(layers=cfg.num_hidden_layers, same_tokens=all(t == tokens[0] for t in tokens),
                variants=[dict(name=n, overrides={k: c.key() for k, c in o.items()}, ms=t,
                               median_ms=statistics.median(t))
                          for (n, o), t in zip(variants, times, strict=True)])


if __name__ == "__main__":
    main()
