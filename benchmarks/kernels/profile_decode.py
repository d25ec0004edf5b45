"""Where does a decode step spend its time? Kernel table and idle gaps of the CUDA-graph decode path.

Builds the random-weight Llama-3-8B-shaped model (bf16), captures the fast decode step, replays it
under torch.profiler and prints the kernels by total time per step (count per step, mean us), so the
fixed per-layer cost next to the GEMVs can be attributed. The timeline part sums, per step, the time
some kernel runs (busy) against the span from the step's first kernel start to its last kernel end: the
rest is launch gaps and waits between kernels. --tp 2 spawns one process per rank (NCCL, the fast
all-reduce and the TP exchange as the benchmarks set them up; --tp-path collectives / no-allreduce for the
one-shot all-reduce or none) and reports every rank; --tp N --rank-alone builds rank 0's shards on one GPU
and decodes without all-reduce (the gather repeats its own logits: timing only), so tp=2's per-rank costs
can be profiled where one GPU is lent; --no-pdl gives each kernel's own duration (with PDL a
kernel's time includes its wait for the one before). Writes
decode-profile-<card>[-moe][-tpN][-bB][-nopdl][-<tp path>].json (the defaults keep the old names; the tp files
before the exchange kernels became the default path timed the one-shot all-reduce).
Usage: python -m benchmarks.kernels.profile_decode [--moe] [--layers N] [--tp N] [--batch B] [--no-pdl]
       [--tp-path exchange|collectives|no-allreduce] [--rank-alone] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

from benchmarks.runtime_hw import card_slug
from benchmarks.runtime_parallel import _no_allreduce
from enginesmith.runtime.kernels import pdl
from enginesmith.runtime.model.random_model import LLAMA_3_8B, MIXTRAL_8X7B, checkpoint_config, random_rank_model

PROMPT_LEN = 512
TP_PATHS = ("exchange", "collectives", "no-allreduce")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--moe", action="store_true", help="the Mixtral-8x7B shape (default 8 layers)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one GPU each)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per decode step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch without programmatic dependent launch: each kernel's duration is its own, not "
                         "stretched by waiting for the kernel before it")
    ap.add_argument("--tp-path", choices=TP_PATHS, default="exchange",
                    help="tp > 1: how the step all-reduces: the TP exchange kernels (the default path), the "
                         "one-shot all-reduce, or nothing (timing only: wrong sums)")
    ap.add_argument("--rank-alone", action="store_true",
                    help="tp > 1 on one GPU: rank 0's shards, no all-reduce, logits gather stood in (timing only)")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    shape, layers = (MIXTRAL_8X7B, a.layers or 8) if a.moe else (LLAMA_3_8B, a.layers)
    p = dict(shape=shape, layers=layers, tp=a.tp, batch=a.batch, steps=a.steps, cuda=True, dtype="bfloat16",
             tp_path="no-allreduce" if a.rank_alone else a.tp_path)
    if a.no_pdl:  # runtime.kernels.pdl.enabled reads it: the decoder and the TP exchange (spawned ranks inherit it)
        os.environ[pdl.ENV_SWITCH] = "0"
    if a.tp == 1 or a.rank_alone:
        ranks = [profile_rank(0, 1, 0, p, tp_size=a.tp)]
    else:
        from benchmarks.runtime_parallel import _need_gpus, _spawn

        _need_gpus(True, a.tp)
        ranks = _spawn(_spawn_body, a.tp, p)
    for r in ranks:
        print(_table(r))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    card = card_slug(torch.cuda.get_device_name())
    suffix = ("-moe" if a.moe else "") + (f"-tp{a.tp}" if a.tp > 1 else "") + (f"-b{a.batch}" if a.batch > 1 else "")
    suffix += ("-nopdl" if a.no_pdl else "") + ("-alone" if a.tp > 1 and a.rank_alone else
                                                f"-{a.tp_path}" if a.tp > 1 and a.tp_path != "exchange" else "")
    path = out / f"decode-profile-{card}{suffix}.json"
    body = ranks[0] if a.tp == 1 else dict(ranks[0], ranks=ranks)
    path.write_text(json.dumps(dict(card=torch.cuda.get_device_name(), tp=a.tp, batch=a.batch, **body), indent=2)
                    + "\n")
    print(f"wrote {path}")


def _spawn_body(rank: int, world: int, port: int, p: dict) -> list[dict] | None:
    """One rank of the spawned job; rank 0 returns every rank's profile (gathered over the control group)."""
    import torch.distributed as dist

    mine = profile_rank(rank, world, port, p)
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    dist.destroy_process_group()
    return ranks if rank == 0 else None


def profile_rank(rank: int, world: int, port: int, p: dict, tp_size: int | None = None) -> dict:
    """Build this rank's model and decoder, warm up (compile + capture), then profile p["steps"] steps.
    tp_size > world (one process): rank 0's shards of a tp_size model decoding alone (no all-reduce, its own
    logits repeated for the gather)."""
    from benchmarks.runtime_decode import make_cache
    from benchmarks.runtime_parallel import _join
    from enginesmith.runtime.fast.fast_decode import FastDecoder

    device, groups = _join(rank, world, port, p, tp_size=world, pp_size=1)
    tp = tp_size or world
    cfg = checkpoint_config(p["shape"], num_layers=p["layers"], dtype=p["dtype"], tp_size=tp)
    model = random_rank_model(cfg, rank, device=device, seed=0)
    reduce = gather = exchange = None
    if groups is None and tp > 1:
        reduce, gather = rank_alone_collectives(tp)
    if groups is not None:
        from enginesmith.runtime.parallel.tp_exchange import for_model

        reduce, gather = groups.all_reduce_tp, groups.gather_tp_last_dim
        groups.enable_fast_all_reduce(p["batch"] * cfg.hidden_size * 2, model.dtype, device)
        if p["tp_path"] == "exchange":  # collective set-up on every rank; off (with its reason) if it fails
            exchange = for_model(groups, model, device)
            exchange = exchange if exchange.enabled else None
        elif p["tp_path"] == "no-allreduce":  # the tokens are fixed, so wrong sums change no step's shape
            reduce = _no_allreduce
    b, steps = p["batch"], p["steps"]
    total = PROMPT_LEN + 2 * steps + 8
    cache = make_cache(model, total, 32, batch=b)
    for s in range(b):
        cache.reserve(s, total)
    dec = FastDecoder(model, cache, max_batch_size=b, max_seq_len=total, reduce=reduce, gather=gather,
                      exchange=exchange)
    seqs, toks = list(range(b)), [1 + 7 * s for s in range(b)]  # distinct ids: a MoE batch spreads over experts
    pos = PROMPT_LEN
    for _ in range(steps):  # warm-up: compile + capture
        dec.decode(seqs, toks, [pos] * b)
        pos += 1
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.decode(seqs, toks, [pos] * b).argmax(-1).tolist()  # a host read per step, as serving does
            pos += 1
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return dict(rank=rank, layers=cfg.num_hidden_layers, status=str(dec.status()),
                **_kernel_table(kernels, steps), **_timeline(kernels, steps),
                **_layer_report(kernels, steps, cfg.num_hidden_layers))


def rank_alone_collectives(tp: int) -> tuple:
    """(reduce, gather) for one rank of a tp-way model decoding alone (timing only): no all-reduce, and this
    rank's logits shard repeated tp times for the gather (the full vocab's shape)."""
    return _no_allreduce, partial(_repeat_last_dim, times=tp)


def _repeat_last_dim(x: torch.Tensor, times: int) -> torch.Tensor:
    return torch.cat([x] * times, dim=-1)


def _kernel_table(kernels, steps: int) -> dict:
    per = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        per[e.name][0] += 1
        per[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    rows = sorted(((n, c / steps, t / steps) for n, (c, t) in per.items()), key=lambda r: -r[2])
    return dict(total_us_per_step=sum(r[2] for r in rows),
                kernels=[dict(name=n, count_per_step=c, us_per_step=u) for n, c, u in rows])


def _step_bounds(iv: list[tuple[float, float]], steps: int) -> tuple[list[tuple[int, int]], list[float], list[float]]:
    """The kernel intervals `iv` (sorted by start) cut into `steps` steps at the steps - 1 largest idle gaps (the
    host's turns between steps): ([(first, end) index ranges], reach, idle) with reach[i] the latest end among
    kernels 0..i and idle[i] the gap before kernel i."""
    reach, idle = [iv[0][1]], [0.0]
    for s, e in iv[1:]:
        idle.append(max(0.0, s - reach[-1]))
        reach.append(max(reach[-1], e))
    cuts = sorted(sorted(range(1, len(iv)), key=idle.__getitem__, reverse=True)[: steps - 1])
    return list(zip([0, *cuts], [*cuts, len(iv)], strict=True)), reach, idle


def _layer_report(kernels, steps: int, layers: int) -> dict:
    """{"layer_slots": _layer_slots(...)}, plus the kernel names of one step when no layer pattern was found."""
    if len(kernels) < steps:
        return dict(layer_slots=[])
    ev, bounds = _steps_of(kernels, steps)
    slots = _slots_of(ev, bounds, layers)
    if slots:
        return dict(layer_slots=slots)
    a, b = _common_step(bounds)
    return dict(layer_slots=[], step_kernels=[n[:60] for _, _, n in ev[a:b]])


def _steps_of(kernels, steps: int) -> tuple[list[tuple[float, float, str]], list[tuple[int, int]]]:
    """(start, end, name) of the kernels sorted by start, and each step's index range (_step_bounds)."""
    ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in kernels))
    return ev, _step_bounds([(s, e) for s, e, _ in ev], steps)[0]


def _common_step(bounds: list[tuple[int, int]]) -> tuple[int, int]:
    """The index range of a step of the most common kernel count (a step cut short at the profiler's start
    is not taken)."""
    lengths = [b - a for a, b in bounds]
    return bounds[lengths.index(max(set(lengths), key=lengths.count))]


def _layer_slots(kernels, steps: int, layers: int) -> list[dict]:
    """The kernels of one layer in launch order (the step's repeating pattern of kernel names over `layers`
    layers): per slot its mean duration, its median (`us_median`: a wait that happens once a step, such as a
    rank that starts early waiting at the step's first all-reduce, lifts the mean of its slot, not the median),
    and the mean time from the previous kernel's end to its start (negative: it started before that end, as
    PDL launches do). [] when no pattern repeats `layers` times."""
    if len(kernels) < steps:
        return []
    return _slots_of(*_steps_of(kernels, steps), layers)


def _slots_of(ev: list[tuple[float, float, str]], bounds: list[tuple[int, int]], layers: int) -> list[dict]:
    """_layer_slots on kernels already sorted and cut into steps (_steps_of)."""
    if layers < 2:
        return []
    a, b = _common_step(bounds)
    names = [n for _, _, n in ev[a:b]]
    for period in range(1, 17):
        span = layers * period
        off = next((o for o in range(len(names) - span + 1)
                    if all(names[o + j] == names[o + j + period] for j in range(span - period))), None)
        if off is not None:
            break
    else:
        return []
    dur: list[list[float]] = [[] for _ in range(period)]
    gap = [0.0] * period
    used = [ev[a:b] for a, b in bounds if b - a == len(names)]
    for step in used:
        for j in range(off, off + span):
            dur[(j - off) % period].append(step[j][1] - step[j][0])
            gap[(j - off) % period] += step[j][0] - step[j - 1][1] if j else 0.0
    n = layers * len(used)
    return [dict(slot=i, name=names[off + i][:80], us=sum(dur[i]) / n, us_median=statistics.median(dur[i]),
                 gap_before_us=gap[i] / n) for i in range(period)]


def _timeline(kernels, steps: int) -> dict:
    """Per step (the kernels cut at the steps - 1 largest idle gaps, which are the host's turns between
    steps): span from first start to last end, busy (union of kernel intervals), the idle time inside."""
    iv = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    if len(iv) < steps:
        return {}
    bounds, reach, idle = _step_bounds(iv, steps)
    cuts = [a for a, _ in bounds[1:]]
    span = sum(reach[b - 1] - iv[a][0] for a, b in bounds) / steps
    gaps = sum(sum(idle[a + 1:b]) for a, b in bounds) / steps
    return dict(step_span_us=span, step_busy_us=span - gaps, step_gaps_us=gaps,
                host_turn_us=sum(idle[c] for c in cuts) / max(len(cuts), 1))


def _table(r: dict) -> str:
    lines = [f"rank {r['rank']}: span {r.get('step_span_us', 0):.0f} us/step, busy {r.get('step_busy_us', 0):.0f}, "
             f"gaps {r.get('step_gaps_us', 0):.0f}, host turn between steps {r.get('host_turn_us', 0):.0f} us; "
             f"kernels {r['total_us_per_step']:.0f} us/step ({r['status'][:300]})",
             f"{'us/step':>9} {'count':>6} {'us each':>8}  kernel"]
    for k in r["kernels"][:25]:
        lines.append(f"{k['us_per_step']:>9.1f} {k['count_per_step']:>6.0f} "
                     f"{k['us_per_step'] / max(k['count_per_step'], 1):>8.2f}  {k['name'][:110]}")
    if r.get("layer_slots"):
        lines.append(f"one layer, in launch order: {'us':>7} {'median':>7} {'gap before':>10}  kernel")
        for k in r["layer_slots"]:
            lines.append(f"{k['slot']:>27} {k['us']:>7.2f} {k.get('us_median', float('nan')):>7.2f} "
                         f"{k['gap_before_us']:>10.2f}  {k['name']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
