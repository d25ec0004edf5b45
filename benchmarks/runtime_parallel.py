"""The multi-rank sections of benchmarks/runtime.py: one spawned process per rank (NCCL on GPUs, gloo on CPU).

tp: greedy decode at batch 1 (latency) and a larger batch (throughput) through FastDecoder with the TP
all-reduce and vocab all-gather inside the captured graph, at tp=1 and tp=2 on the same machine; each step's
token is fed back on the GPU (no host sync per token; the host-synced loop is timed beside it).
pp: one prefill-sized step through runtime.parallel.pipeline.rank_forward at pp=2 split into m micro-batches (the
engine's prefill layers: graphed on CUDA, timed beside compiled-only and eager layers);
the bubble is 1 - (one stage's time for the whole step) / (step time), against (p-1)/(m+p-1).
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import statistics
import time
from pathlib import Path

import torch

from enginesmith.runtime.model.random_model import (LLAMA_3_8B, LLAMA_3_70B, MIXTRAL_8X7B, TINY_LLAMA,
                                                    checkpoint_config, random_rank_model)

TP_SHAPES = {"llama-3-8b": LLAMA_3_8B, "llama-3-70b": LLAMA_3_70B, "mixtral-8x7b": MIXTRAL_8X7B}
"""--tp-shape choices (--tp-layers trims them: the tp=1 run must fit one GPU)."""
TP_DEFAULT_LAYERS = {"mixtral-8x7b": 8}
"""Layers when --tp-layers is not given (else the shape's own): 8 Mixtral layers fit one GPU, as in the moe section
(at tp=2 its experts split as moe_tp_size=2, the planner's default for tp=2 without moe_ep_size)."""


def tp_section(bench) -> dict:
    tiny, cuda = bench.args.tiny, bench.device.type == "cuda"
    _need_gpus(cuda, 2)
    shape = TINY_LLAMA if tiny else TP_SHAPES[bench.args.tp_shape]
    layers = None if tiny else bench.args.tp_layers or TP_DEFAULT_LAYERS.get(bench.args.tp_shape)
    p = dict(shape=shape, layers=layers, dtype="bfloat16" if cuda else "float32",
             cuda=cuda,
             prompt_len=16 if tiny else 512, steps=8 if tiny else 128, batches=(1, 4) if tiny else (1, 32),
             tpb=4 if tiny else 32, options=bench.decoder_options())
    res = {}
    for tp in (1, 2):
        bench.progress(f"tp={tp}: spawning {tp} rank(s)")
        res[f"tp{tp}"] = _spawn_tp(bench, tp, p, res)
        bench.progress(f"tp={tp}: " + ", ".join(f"batch {b}: {v['tok_s']:.1f} tok/s" for b, v in res[f"tp{tp}"].items()
                                                 if isinstance(v, dict) and "tok_s" in v))
    one, two = res["tp1"], res["tp2"]
    check = logits_check(*(torch.from_numpy(r.pop("prefill_logits")) for r in (one, two)))
    b1, bn = (str(b) for b in p["batches"])
    regions = {f"speedup_batch1_latency_{key[2:]}": two[key]["tok_s"] / one[key]["tok_s"]
               for key in ("1_no_pdl", "1_cublas_regions") if key in one and key in two}
    if f"{bn}_rows" in two and f"{bn}_rows" in one:
        regions["speedup_throughput_rows"] = two[f"{bn}_rows"]["tok_s"] / one[f"{bn}_rows"]["tok_s"]
    if "1_collectives" in two:  # the step without the TP exchange (its default when it is on)
        regions["tp2_batch1_exchange_gain"] = two[b1]["tok_s"] / two["1_collectives"]["tok_s"]
        regions["speedup_batch1_latency_collectives"] = two["1_collectives"]["tok_s"] / one[b1]["tok_s"]
    regions["speedup_batch1_latency_host_sync"] = two[b1]["tok_s_host_sync"] / one[b1]["tok_s_host_sync"]
    if "1_no_allreduce" in two:  # timing only: tp=2 without its all-reduces
        regions["speedup_batch1_latency_no_allreduce"] = two["1_no_allreduce"]["tok_s"] / one[b1]["tok_s"]
    model = dict(shape="tiny" if tiny else bench.args.tp_shape,
                 layers=p["layers"] or p["shape"]["num_hidden_layers"])
    return dict(res, **regions, model=model, speedup_batch1_latency=two[b1]["tok_s"] / one[b1]["tok_s"],
                speedup_throughput=two[bn]["tok_s"] / one[bn]["tok_s"], target_speedup_batch1=1.7,
                greedy_prefix_match=_prefix(one["tokens"], two["tokens"]), tokens_compared=len(one["tokens"]),
                logits_check=check, logits_rel_err_tp1_tp2=check["rel_err"],
                logits_tp1_top2_margin_over_max_diff=check["tp1_top2_margin"] / max(check["max_abs_diff"], 1e-30),
                **_all_reduce_summary(two), **ceiling(one, two, b1, model["layers"]))


def logits_check(one: torch.Tensor, two: torch.Tensor) -> dict:
    """tp=1 against tp=2 on the same prompt's prefill logits (the last position, batch 1). The two layouts sum
    in different orders (each rank its half of a row, then the all-reduce), so in bf16 the logits differ by
    rounding; a random-weight model's top two logits can lie closer together than that (`tp1_top2_margin` under
    twice `max_abs_diff`), and then greedy tokens part from the first one (`greedy_prefix_match`) while the
    logits agree (`rel_err`)."""
    diff = (two - one).abs()
    top2 = one.topk(2).values
    return dict(rel_err=float(diff.norm() / one.norm().clamp_min(1e-30)), max_abs_diff=float(diff.max()),
                logit_std=float(one.std()), tp1_top2_margin=float(top2[0] - top2[1]),
                same_top1=int(one.argmax()) == int(two.argmax()))


def ceiling(one: dict, two: dict, b1: str, layers: int) -> dict:
    """What bounds the batch-1 TP=2 speedup, from this run's own numbers (CUDA runs: ranks report their bytes
    per step and the copy bandwidth): each step's streaming time (weight + KV bytes / copy bandwidth) and the
    rest (its fixed costs: launches, ramps, attention, all-reduces). `speedup_ceiling`: tp=1's step over a tp=2
    step that streams its half and carries tp=1's fixed costs unchanged plus 2 x layers one-shot all-reduces at
    their measured in-graph time; `..._free_allreduce`: the same with all-reduces that cost nothing. tp=2's
    step is the one with the one-shot all-reduce: its `1_collectives` row where the TP exchange ran the main one."""
    if "copy_gbps" not in one or "step_bytes" not in one or "step_bytes" not in two:
        return {}
    bw = one["copy_gbps"] * 1e9
    t1, t2 = one[b1]["ms_per_step"] / 1e3, (two.get("1_collectives") or two[b1])["ms_per_step"] / 1e3
    s1, s2 = one["step_bytes"] / bw, two["step_bytes"] / bw
    micro = two.get("allreduce_micro", {})
    ar_us = micro.get("fast_us") or micro.get("nccl_us")
    out = dict(tp1_stream_ms=1e3 * s1, tp1_fixed_ms=1e3 * (t1 - s1), tp2_stream_ms=1e3 * s2,
               tp2_fixed_ms=1e3 * (t2 - s2), allreduces_per_step=2 * layers,
               speedup_ceiling_free_allreduce=t1 / (s2 + t1 - s1))
    if ar_us:
        out |= dict(allreduce_us=ar_us, speedup_ceiling=t1 / (s2 + t1 - s1 + 2 * layers * ar_us / 1e6))
    return {"ceiling": out}


def _spawn_tp(bench, tp: int, p: dict, res: dict) -> dict:
    """tp ranks; if the tp=2 run dies with the fast all-reduce on, record why and rerun it on NCCL alone."""
    from enginesmith.runtime.parallel.fast_allreduce import ENV_SWITCH
    from enginesmith.runtime.parallel.tp_exchange import ENV_SWITCH as EXCHANGE_SWITCH

    try:
        return _spawn(_tp_rank, tp, p)
    except Exception as e:
        if tp == 1 or not p["cuda"] or os.environ.get(ENV_SWITCH, "1") == "0":
            raise
        res[f"tp{tp}_fast_allreduce_crash"] = str(e)[-3000:]
        bench.progress(f"tp={tp} FAILED with the fast all-reduce on ({type(e).__name__}); rerunning with "
                       f"{ENV_SWITCH}=0 {EXCHANGE_SWITCH}=0")
    os.environ[ENV_SWITCH] = os.environ[EXCHANGE_SWITCH] = "0"  # spawned ranks inherit them
    try:
        return _spawn(_tp_rank, tp, p)
    finally:
        del os.environ[ENV_SWITCH], os.environ[EXCHANGE_SWITCH]


_BASELINES_BATCH1 = (
    ("1_no_pdl", dict(pdl=False)),  # fused GEMVs launched without programmatic dependent launch
    ("1_cublas_regions", dict(gemv=False)),
)
"""Batch-1 paths timed after the main one in the same ranks: (result key, FastDecoder options)."""


def _no_allreduce(x: torch.Tensor) -> torch.Tensor:
    """The "1_no_allreduce" row's stand-in for the TP all-reduce: nothing. Timing only (each rank decodes with
    its own partial sums, wrong tokens): what the tp=2 step costs when its all-reduces cost nothing."""
    return x


def _baselines(batch: int, exchange, moe: bool = False) -> tuple[tuple[str, dict], ...]:
    """The paths timed after the main one at `batch`: at batch 1, when the main one ran the TP exchange (on by
    default, runtime/parallel/tp_exchange.py), the step with the one-shot all-reduce instead ("1_collectives"), then
    _BASELINES_BATCH1 (both without the exchange); at larger batches the opt-in rows kernels (dense), or the
    experts on torch's grouped GEMM (MoE)."""
    if batch > 1:
        return ((f"{batch}_grouped_mm", dict(moe_rows=False)),) if moe else ((f"{batch}_rows", dict(rows=True)),)
    rows = (("1_collectives", {}),) if exchange is not None else ()
    return tuple((name, kw | dict(exchange=None)) for name, kw in rows + _BASELINES_BATCH1)


def pp_runs(pp: dict) -> dict[str, dict]:
    """The pp section's result by layer runner: the main run (its own keys; "" in files older than the
    runners) first, then the baselines timed beside it."""
    return {pp.get("layers", ""): pp, **pp.get("baselines", {})}


def _all_reduce_summary(two: dict) -> dict:
    """Top-level keys (the summary table prints them): which TP all-reduce the tp=2 decode ran, and the
    8 KB in-graph microbenchmark."""
    ar, micro = two.get("all_reduce") or {}, two.get("allreduce_micro") or {}
    ran = f"symm_mem {ar['method']}" if ar.get("enabled") else f"dist.all_reduce ({ar.get('reason', 'unknown')})"
    return dict(fast_allreduce_used=bool(ar.get("enabled")), all_reduce_tp2=ran,
                fast_allreduce_calls=(ar.get("calls") or {}).get("fast", 0),
                allreduce_8kb_graph_nccl_us=micro.get("nccl_us"), allreduce_8kb_graph_fast_us=micro.get("fast_us"))


def pp_section(bench) -> dict:
    tiny, cuda = bench.args.tiny, bench.device.type == "cuda"
    _need_gpus(cuda, 2)
    p = dict(shape=TINY_LLAMA if tiny else LLAMA_3_8B, dtype="bfloat16" if cuda else "float32", cuda=cuda,
             seqs=8 if tiny else 16, seq_len=8 if tiny else 512, micro=(1, 2, 4, 8), repeat=3)
    bench.progress("pp=2: spawning 2 ranks")
    out = _spawn(_pp_rank, 2, p)
    out["predicted_bubble"] = {m: 1 / (m + 1) for m in p["micro"]}
    png = _plot(out, Path(bench.out).with_suffix(".pp-bubble.png"))
    return out | dict(plot=str(png) if png else None)


# ---- rank bodies (spawned) ----
def _tp_rank(rank: int, world: int, port: int, p: dict) -> dict | None:
    from benchmarks.runtime_decode import make_cache
    from enginesmith.runtime.model.paged_attention import SeqSpan
    from enginesmith.runtime.model.plain_step import plain_forward

    device, groups = _join(rank, world, port, p, tp_size=world, pp_size=1)
    cfg = checkpoint_config(p["shape"], num_layers=p["layers"], dtype=p["dtype"], tp_size=world)
    model = random_rank_model(cfg, rank, device=device, seed=0)
    reduce, gather = (groups.all_reduce_tp, groups.gather_tp_last_dim) if groups else (None, None)
    out: dict = {"all_reduce": dict(enabled=False, reason="tp=1: no all-reduce")}
    if p["cuda"]:  # what one batch-1 step streams on this rank (weights, KV at the mean context), and how fast
        from benchmarks.runtime_hw import copy_bandwidth
        from enginesmith.runtime.engine.kv_cache import PagedKVCache
        from enginesmith.runtime.model.random_model import weight_bytes_per_token

        kv = PagedKVCache.bytes_per_token(model.num_local_layers, model.num_kv_heads, model.head_size, model.dtype)
        out["step_bytes"] = weight_bytes_per_token(model) + int(kv * (p["prompt_len"] + p["steps"] / 2))
        out["copy_gbps"] = copy_bandwidth(device, 1 << 30)["copy_gbps"]
    if groups is not None:  # issue 6: decode-sized TP all-reduces take the one-shot P2P kernel if it checks out
        max_bytes = max(p["batches"]) * cfg.hidden_size * torch.empty((), dtype=model.dtype).element_size()
        out["all_reduce"] = groups.enable_fast_all_reduce(max_bytes, model.dtype, device)
    exchange = None
    if groups is not None and p["cuda"]:  # the TP exchange (ENGINESMITH_TP_EXCHANGE, default "kernel")
        from enginesmith.runtime.parallel.tp_exchange import for_model

        exchange = for_model(groups, model, device)
        out["tp_exchange"] = exchange.status()
        exchange = exchange if exchange.serves(cfg.is_moe) else None
    for bs in p["batches"]:
        total = p["prompt_len"] + 2 * p["steps"] + 1
        cache = make_cache(model, total, p["tpb"], batch=bs)
        gen = torch.Generator().manual_seed(bs)
        prompts = torch.randint(0, cfg.vocab_size, (bs, p["prompt_len"]), generator=gen)
        for s in range(bs):
            cache.reserve(s, total)
        spans = [SeqSpan(s, 0, p["prompt_len"]) for s in range(bs)]
        logits = plain_forward(model, cache, spans, prompts.flatten().tolist(), reduce, gather)
        first = logits.argmax(-1).tolist()
        if bs == 1:  # compared with the other layout's in tp_section (logits_check)
            out["prefill_logits"] = logits[0].float().cpu().numpy()  # by value: a tensor would go by shared memory
        dec_args = dict(model=model, cache=cache, max_batch_size=bs, max_seq_len=total, reduce=reduce,
                        gather=gather, exchange=exchange if bs == 1 else None) | p["options"]
        tokens, out[str(bs)] = _timed(dec_args, first, p, device)
        if bs == 1:
            out["tokens"] = [t[0] for t in tokens]
            if exchange is not None:
                try:
                    exchange.check_error()
                except RuntimeError as e:  # recorded, not raised: the peer would hang in the next collectives
                    out[str(bs)]["exchange_error"] = str(e)
        if p["cuda"] and p["options"].get("gemv") is None:  # same run: the other paths at this batch
            skip = (("1_no_allreduce", dict(reduce=_no_allreduce, exchange=None)),) if bs == 1 and world > 1 else ()
            for name, kw in _baselines(bs, exchange, cfg.is_moe) + skip:
                toks, row = _timed(dec_args | kw, first, p, device)
                out[name] = {k: v for k, v in row.items() if k != "status"} | dict(same_tokens=toks == tokens)
        del cache
    if groups is not None:
        import torch.distributed as dist

        if groups.fast_ar is not None:
            out["all_reduce"] = groups.fast_ar.status()  # with the calls the decode graphs captured
        if p["cuda"]:
            from benchmarks.runtime_allreduce import graph_allreduce_us

            out["allreduce_micro"] = graph_allreduce_us(groups, device, model.dtype)
        dist.destroy_process_group()
    return out if rank == 0 else None


def _pp_rank(rank: int, world: int, port: int, p: dict) -> dict | None:
    import torch.distributed as dist

    from enginesmith.runtime.model.attention import DenseCausalAttention
    from enginesmith.runtime.parallel.pipeline import MicroBatch, rank_forward, run_layers
    from enginesmith.runtime.fast.prefill_graphs import GraphedPrefill, layer_runner

    device, groups = _join(rank, world, port, p, tp_size=1, pp_size=world)
    cfg = checkpoint_config(p["shape"], dtype=p["dtype"], pp_size=world)
    model = random_rank_model(cfg, rank, device=device, seed=0)
    n, length = p["seqs"], p["seq_len"]
    ids = torch.randint(0, cfg.vocab_size, (n * length,), generator=torch.Generator().manual_seed(0)).to(device)

    def micro(m: int) -> list[MicroBatch]:
        per = n // m
        positions = torch.arange(length, device=device).repeat(per)
        last = torch.arange(per, device=device) * length + length - 1
        return [MicroBatch(ids[j * per * length:(j + 1) * per * length], positions, last,
                           DenseCausalAttention([length] * per)) for j in range(m)]

    def timed(fn) -> float:
        times = []
        for _ in range(p["repeat"] + 1):
            dist.barrier(group=groups.control)
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    full = micro(1)[0]
    hidden = torch.randn(n * length, cfg.hidden_size, device=device, dtype=model.dtype) * 0.02
    runners = {"eager": run_layers}
    default = layer_runner(device)
    if isinstance(default, GraphedPrefill):  # CUDA: what the engine runs, then without graphs, then eager
        runners = {"graphed": default, "compiled": default.regions, **runners}
    runs = {}
    with torch.inference_mode():
        for name, layers in runners.items():
            stage = timed(lambda layers=layers: layers(model, None, hidden, full))
            steps = {m: timed(lambda m=m, layers=layers: rank_forward(model, groups, micro(m), layers))
                     for m in p["micro"]}
            stages = [None] * world
            dist.all_gather_object(stages, stage, group=groups.control)
            t_stage = max(stages)
            runs[name] = dict(stage_s=stages, step_s=steps,
                              measured_bubble={m: max(0.0, 1 - t_stage / s) for m, s in steps.items()})
    fallback = default.status()["fallback"] if isinstance(default, GraphedPrefill) else ""
    dist.destroy_process_group()
    if rank:
        return None
    main = next(iter(runs))
    return dict(runs[main], layers=main, baselines={k: v for k, v in runs.items() if k != main},
                prefill_fallback=fallback, tokens_per_step=n * length)


# ---- process plumbing ----
def _join(rank: int, world: int, port: int, p: dict, tp_size: int, pp_size: int):
    from enginesmith.builders.mapping import Mapping
    from enginesmith.runtime.parallel.groups import init_parallel

    device = torch.device("cuda", rank) if p["cuda"] else torch.device("cpu")
    if p["cuda"]:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    if world == 1:
        return device, None
    mapping = Mapping.create(tp_size=tp_size, pp_size=pp_size)
    groups = init_parallel(mapping, rank, f"tcp://127.0.0.1:{port}", "nccl" if p["cuda"] else "gloo", 120.0)
    return device, groups


def _entry(fn, rank: int, world: int, port: int, p: dict, queue) -> None:
    try:
        queue.put((rank, fn(rank, world, port, p), None))
    except BaseException as e:  # report, don't hang the parent
        import traceback

        queue.put((rank, None, "".join(traceback.format_exception(e))[-3000:]))


def _spawn(fn, world: int, p: dict, timeout_s: float = 540.0) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, p, queue), daemon=True) for r in range(world)]
    for proc in procs:
        proc.start()
    result, errors, deadline = None, [], time.monotonic() + timeout_s
    try:
        for _ in range(world):
            try:
                rank, value, err = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue_mod.Empty:
                errors.append(f"{world - len(errors)} rank(s) sent nothing before the deadline")
                break
            result = value if rank == 0 else result
            errors += [f"rank {rank}: {err}"] if err else []
            if err:  # the others may wait on it in a collective: give them a short grace, not the whole timeout
                deadline = min(deadline, time.monotonic() + 30.0)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
    if errors:
        raise RuntimeError("\n".join(errors))
    return result


def _need_gpus(cuda: bool, n: int) -> None:
    if cuda and torch.cuda.device_count() < n:
        raise RuntimeError(f"this section needs {n} GPUs, the machine has {torch.cuda.device_count()} "
                           "(run it on nvidia-h100-x2, or with --device cpu --tiny)")


def _timed(dec_args: dict, first: list[int], p: dict, device) -> tuple[list[list[int]], dict]:
    """Greedy steps through FastDecoder(**dec_args) after a warm-up run (compile, capture): tokens and the
    result row: tok/s and ms per step with the next token fed on the device (no host sync per token, the
    figures the summary compares), the same with the host reading each token before the next step
    (`*_host_sync`), and the decoder's status."""
    from benchmarks.runtime_decode import greedy_batch
    from enginesmith.runtime.fast.fast_decode import FastDecoder

    dec, bs, steps = FastDecoder(**dec_args), len(first), p["steps"]
    greedy_batch(dec, first, p["prompt_len"], steps, device)
    tokens, secs = greedy_batch(dec, first, p["prompt_len"], steps, device)
    fed, secs_fed = greedy_batch(dec, first, p["prompt_len"], steps, device, on_device=True)
    row = dict(tok_s=bs * steps / secs_fed, ms_per_step=1e3 * secs_fed / steps, tok_s_host_sync=bs * steps / secs,
               ms_per_step_host_sync=1e3 * secs / steps, status=dec.status())
    if fed != tokens:
        row["device_fed_tokens_differ_at_step"] = _prefix(fed, tokens)
    return tokens, row


def _plot(out: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from matplotlib.ticker import NullFormatter

    ms = sorted(out["measured_bubble"], key=int)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, run in pp_runs(out).items():
        label = f"measured, {name} layers" if name else "measured"
        ax.plot([int(m) for m in ms], [run["measured_bubble"][m] for m in ms], "o-", label=label)
    ax.plot([int(m) for m in ms], [out["predicted_bubble"][m] for m in ms], "s--", label="(p-1)/(m+p-1)")
    ax.set(xscale="log", xlabel="micro-batches m", ylabel="bubble fraction", title="pp=2 pipeline bubble")
    ax.set_xticks([int(m) for m in ms], [str(m) for m in ms])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
