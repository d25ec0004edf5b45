"""Where does a TP=2 exchange point's time go? NVLink latency, the exchange mechanism, the GEMVs around it.

Issue 6's TP=2 batch-1 target misses on Llama-3-8B because each of the step's 64 all-reduces costs 6.5-10.5 us
in the step (README, "What misses and why"). This separates that cost into parts, on 2 GPUs (one rank each):

1. `pingpong`: one program per rank bounces a counter through the peer's memory (store to the peer over
   NVLink, volatile polls of its own word) N times: the one-way latency, the floor of any exchange.
2. `mini`: CUDA graphs of P producer -> consumer kernel pairs doing only the exchange of one 8 KB hidden
   vector, the way runtime/parallel/tp_exchange.py does it (every producer program stores its share into every rank's
   slot, each consumer program waits until the slots have landed, sums them and empties the next set; PDL as in
   the step), once with the peer in the exchange (tp=2) and once with this rank alone (tp=1 tables: the same
   kernels and launches, no NVLink): the difference is what crossing GPUs costs a point at kernel granularity.
   Three ways to wait (runtime/tp_signal.await_landed): `_seq` chunk after chunk in every program (the step's),
   `_vec` all chunks at once in every program, and the plain rows: program 0 polls, then hands over through a
   ready word; 8 programs a kernel, or one (`_1prog*`).
3. `gemv`: P pairs of the step's real tp=2 kernels (o_proj 4096x2048 with the residual -> the RMSNorm +
   gate/up + SwiGLU GEMV 7168x4096, distinct weight copies so L2 holds none) joined: with nothing between them
   (`local`, wrong sums: the floor), the one-shot symmetric-memory all-reduce kernel the step uses
   (`one_shot`), the exchange as a small kernel of its own between them (`kernel`: the gate/up GEMV launches
   as that kernel starts; `kernel_late`: after it has summed; `split`: o_proj stores into the slots itself, the
   kernel only polls and sums), and the fused exchange polling each of the three
   ways (`exchange_seq|vec|handoff`). Their differences per pair are what one all-reduce point costs next to
   weight streaming; `one_shot_alone` and `kernel_alone` time P all-reduce kernels back to back.

Each graph is replayed REPLAYS times back to back between two events after a barrier (the ranks start
together once, not per replay); the median of ROUNDS such runs is kept. Writes
exchange-latency-<card>.json. Needs 2 CUDA GPUs with peer access.
Usage: python -m benchmarks.kernels.exchange_latency [--points 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.kernels.graph_timing import time_graph
from benchmarks.runtime import write_atomic
from benchmarks.runtime_hw import card_slug
from enginesmith.runtime.parallel import tp_signal

HID, O_IN, GU_ROWS = 4096, 2048, 2 * 7168  # Llama-3-8B at tp=2: o_proj's K slice, gate/up's rows (both halves)
REPLAYS, ROUNDS, PINGS = 20, 5, 2000


@triton.jit
def _store_volatile(P, v):
    tl.inline_asm_elementwise("st.volatile.global.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r", [P, v],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _pingpong_kernel(MINE, PEER, base, n, spin, ERR, FIRST: tl.constexpr):
    """FIRST (rank 0) stores base + i into the peer's word, then waits for its own word to say base + i; the
    other rank waits first, then answers. One program, lane 0 doing the work (the masked lanes read MINE[0])."""
    offs = tl.arange(0, 32)
    mask = offs < 1
    peer = tl.load(PEER).to(tl.pointer_type(tl.int32))
    for i in range(1, n + 1):
        want = base + i
        if FIRST:
            _store_volatile(peer + offs * 0, tl.full([32], 0, tl.int32) + want)
        v = tp_signal._load_volatile(MINE, offs, mask)
        k = 0
        while (tl.max(v, 0) < want) & (k < spin):
            v = tp_signal._load_volatile(MINE, offs, mask)
            k += 1
        if k >= spin:
            tl.atomic_xchg(ERR, 1)
        if not FIRST:
            _store_volatile(peer + offs * 0, tl.full([32], 0, tl.int32) + want)


@triton.jit
def _mini_producer(DST, DSET, EPOCH, N, PDL: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr):
    """This rank's share of one point: program pid stores BLOCK values into every rank's slot (as a residual
    GEMV's programs do after their K loop)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = (offs % 7 + 1).to(tl.float32).to(tl.bfloat16)
    tp_signal.scatter(v, offs, mask, DST, (tl.load(EPOCH) % 3) * DSET, TP)


@triton.jit
def _mini_consumer(XS, XSET, OUT, EPOCH, ERR, SPIN, READY, N, PDL: tl.constexpr, TP: tl.constexpr,
                   CHUNKS: tl.constexpr, HANDOFF: tl.constexpr, BLOCK: tl.constexpr):
    """What a consumer GEMV program does before its K loop: start its dependents, empty its share of the next
    set, poll every rank's slot until landed, then read the sum (one BLOCK of it) out."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    epoch = tl.load(EPOCH)
    xs = XS + (epoch % 3) * XSET
    tp_signal.clear(XS + ((epoch + 1) % 3) * XSET, TP * N, BLOCK)
    tp_signal.await_landed(xs, TP * N, tl.load(ERR) == 0, ERR, SPIN, READY, (epoch + 1).to(tl.int32), BLOCK,
                           CHUNKS, HANDOFF)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(OUT + offs, tp_signal.slot_sum(xs, N, offs, mask, TP), mask=mask)


def _timed_graph(fn, barrier) -> float:
    """ms per replay of a graph of fn: REPLAYS replays back to back after a barrier, median of ROUNDS."""
    return time_graph(fn, reps=ROUNDS, replays=REPLAYS, barrier=barrier)


def _pingpong(rank: int, group, barrier, device) -> dict:
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    import torch.distributed._symmetric_memory as symm_mem

    buf = symm_mem.empty(64, dtype=torch.int32, device=device)
    buf.zero_()
    torch.cuda.synchronize()
    handle = symm_mem.rendezvous(buf, group.group_name)
    peer = torch.tensor([int(handle.buffer_ptrs[1 - rank])], dtype=torch.int64, device=device)
    err = torch.zeros(2, dtype=torch.int32, device=device)
    _pingpong_kernel[(1,)](buf, peer, 0, 0, tp_signal.SPIN_LIMIT, err, FIRST=rank == 0, num_warps=1)  # compile
    torch.cuda.synchronize()
    one_way = []
    for r in range(ROUNDS):  # the words only grow: round r counts on from r * (PINGS + 1), the same on both ranks
        torch.cuda.synchronize()
        barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        _pingpong_kernel[(1,)](buf, peer, r * (PINGS + 1), PINGS, tp_signal.SPIN_LIMIT, err, FIRST=rank == 0,
                               num_warps=1)
        b.record()
        torch.cuda.synchronize()
        one_way.append(1e3 * a.elapsed_time(b) / (2 * PINGS))
    barrier()
    return dict(one_way_us=sorted(one_way)[len(one_way) // 2], rounds_us=one_way, pings=PINGS,
                gave_up=bool(int(err[0])))


def _rank(rank: int, world: int, port: int, p: dict) -> dict | None:
    import torch.distributed as dist

    from benchmarks.runtime_parallel import _join
    from enginesmith.runtime.kernels import pdl as pdl_mod
    from enginesmith.runtime.parallel.tp_exchange import TPExchange
    from enginesmith.runtime.kernels.triton_gemv import POLL_ENV, gemv, poll_switches

    device, groups = _join(rank, world, port, p, tp_size=world, pp_size=1)
    group = groups.tp_group

    def barrier() -> None:  # over the gloo control group: nothing on the GPU stream
        dist.barrier(groups.control)

    out: dict = dict(card=torch.cuda.get_device_name(device), points=p["points"])
    out["pingpong"] = _pingpong(rank, group, barrier, device)
    P, dt, use_pdl = p["points"], torch.bfloat16, pdl_mod.enabled(device)
    out["pdl"] = use_pdl
    ex = TPExchange(group, rank, world, device, dt, HID, 2048, P, pdl=use_pdl)
    out["exchange_status"] = ex.status()
    ar = groups.enable_fast_all_reduce(HID * 2, dt, device)
    out["fast_all_reduce"] = {k: v for k, v in ar.items() if k in ("enabled", "method", "reason")}

    # 2. the exchange alone, tp=2 vs this rank's own slot only
    if not ex.enabled:
        raise RuntimeError(f"the TP exchange did not set up: {ex.status()}")
    link = ex.link
    slots = ex._slots  # (3, P, tp, HID)
    own = torch.tensor([[ex._dst[i, rank].item()] for i in range(P)], dtype=torch.int64, device=device)
    sink = torch.empty(HID, dtype=torch.float32, device=device)

    def mini(tp: int, block: int, poll: str):
        grid = (triton.cdiv(HID, block),)
        way = poll_switches(poll, tp * HID, block)

        def run() -> None:
            link.epoch.add_(1)
            for i in range(P):
                dst = ex._dst[i] if tp == world else own[i]
                xs = slots[0, i] if tp == world else slots[0, i, rank]
                _mini_producer[grid](dst, ex._slot_set, link.epoch, HID, PDL=use_pdl, TP=tp, BLOCK=block,
                                     launch_pdl=use_pdl, num_warps=4)
                _mini_consumer[grid](xs, ex._slot_set, sink, link.epoch, link.err, link.spin, link.ready[i:], HID,
                                     PDL=use_pdl, TP=tp, CHUNKS=way["XCHUNKS"], HANDOFF=way["XHANDOFF"], BLOCK=block,
                                     launch_pdl=use_pdl, num_warps=4)
        return run

    ms = {}
    for block, poll, tag in ((512, "handoff", ""), (512, "vec", "_vec"), (512, "seq", "_seq"),
                             (4096, "seq", "_1prog_seq"), (4096, "vec", "_1prog")):
        for tp in (1, 2):  # 8 programs a kernel (or one); tp_signal.await_landed's three ways to poll
            ex.reset()
            ms[f"mini_tp{tp}{tag}"] = _timed_graph(mini(tp, block, poll), barrier)
    ex.reset()

    # 3. the step's kernels around one point
    gen = torch.Generator(device=device).manual_seed(rank)
    w_o = [torch.randn(HID, O_IN, generator=gen, device=device, dtype=dt) * 0.02 for _ in range(P)]
    w_gu = [torch.randn(GU_ROWS, HID, generator=gen, device=device, dtype=dt) * 0.02 for _ in range(P)]
    norm = torch.ones(HID, dtype=dt, device=device)
    attn = torch.randn(1, O_IN, generator=gen, device=device, dtype=dt)
    h = torch.randn(1, HID, generator=gen, device=device, dtype=dt)
    res = h if rank == 0 else None

    def pairs(how: str):
        def run() -> None:
            if how not in ("local", "one_shot"):
                ex.begin_step()
            for i in range(P):
                if how in ("exchange", "split"):
                    gemv(attn, w_o[i], residual=res, pdl=use_pdl, send=ex.send(i))
                    if how == "exchange":
                        gemv(h, w_gu[i], norm=norm, swiglu=True, pdl=use_pdl, recv=ex.recv(i))
                        continue
                    y = ex.landed_sum(i)
                else:
                    y = gemv(attn, w_o[i], residual=res, pdl=use_pdl)
                    if how == "one_shot":
                        y = groups.all_reduce_tp(y)
                    elif how.startswith("kernel"):
                        y = ex.all_reduce(i, y, early=how == "kernel")
                gemv(y, w_gu[i], norm=norm, swiglu=True, pdl=use_pdl)
        return run

    def ar_alone() -> None:
        for _ in range(P):
            groups.all_reduce_tp(h)

    def kernel_alone() -> None:
        ex.begin_step()
        for i in range(P):
            ex.all_reduce(i, h)

    ms["gemv_local"] = _timed_graph(pairs("local"), barrier)
    if groups.fast_ar is not None:
        ms["gemv_one_shot"] = _timed_graph(pairs("one_shot"), barrier)
        ms["one_shot_alone"] = _timed_graph(ar_alone, barrier)
    for how in ("kernel", "kernel_late", "split"):  # each point a kernel of its own (TPExchange.all_reduce,
        # .landed_sum)
        ex.reset()
        ms[f"gemv_{how}"] = _timed_graph(pairs(how), barrier)
    ex.reset()
    ms["kernel_alone"] = _timed_graph(kernel_alone, barrier)
    for poll in ("seq", "vec", "handoff"):  # the consumer GEMV's ways to poll (runtime/triton_gemv.x_poll)
        os.environ[POLL_ENV] = poll
        ex.reset()
        ms[f"gemv_exchange_{poll}"] = _timed_graph(pairs("exchange"), barrier)
    os.environ.pop(POLL_ENV)
    out["exchange_after"] = ex.status()
    out["ms_per_graph"] = ms
    out["us_per_point"] = _per_point(ms, P)
    gathered = [None] * world
    dist.all_gather_object(gathered, out, group=groups.control)
    dist.destroy_process_group()
    return dict(gathered[0], ranks=gathered) if rank == 0 else None


def _per_point(ms: dict, points: int) -> dict:
    """Per pair (us) of each graph, and the differences that isolate one point's cost."""
    us = {k: 1e3 * v / points for k, v in ms.items()}
    diff = {}
    for tag in ("", "_vec", "_seq", "_1prog_seq", "_1prog"):
        if f"mini_tp2{tag}" in us:
            diff[f"mini_cross_gpu{tag}"] = us[f"mini_tp2{tag}"] - us[f"mini_tp1{tag}"]
    for k in ("gemv_one_shot", "gemv_kernel", "gemv_kernel_late", "gemv_split", "gemv_exchange_seq",
              "gemv_exchange_vec", "gemv_exchange_handoff"):
        if k in us:
            diff[k.removeprefix("gemv_") + "_over_local"] = us[k] - us["gemv_local"]
    return dict(per_pair=us, cost=diff)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels.exchange_latency",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=32, help="exchange points (pairs) per graph")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise SystemExit("exchange_latency needs 2 CUDA GPUs with peer access (nvidia-h100-x2)")
    from benchmarks.runtime_parallel import _spawn
    from enginesmith.runtime.parallel.tp_exchange import ENV_SWITCH

    os.environ[ENV_SWITCH] = "1"  # the spawned ranks read it when they set the exchange up
    r = _spawn(_rank, 2, dict(cuda=True, points=a.points), timeout_s=400)
    print(f"{r['card']} x 2, {a.points} points per graph, PDL {r['pdl']}")
    for x in r["ranks"]:
        pp, pt = x["pingpong"], x["us_per_point"]
        print(f"  ping-pong one-way {pp['one_way_us']:.2f} us (gave up: {pp['gave_up']})")
        print("  per pair (us): " + ", ".join(f"{k} {v:.2f}" for k, v in pt["per_pair"].items()))
        print("  point cost (us): " + ", ".join(f"{k} {v:.2f}" for k, v in pt["cost"].items()))
    path = Path(a.out) / f"exchange-latency-{card_slug(r['card'])}.json"
    write_atomic(path, json.dumps(r, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
