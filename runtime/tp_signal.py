"""Cross-rank signals for the fused TP exchange (runtime/tp_exchange.py), as Triton functions.

A producer kernel (o_proj, down, lm_head on every TP rank) stores its slice into its own buffer; each of its
programs counts itself on a counter there, and the program that arrives last copies the whole slice into
every peer's buffer, fences once, and writes the step's epoch into a flag in each peer's memory (release,
system scope). A one-warp wait kernel before the consumer polls its flags (acquire loads) until each peer's reaches the
epoch; launched with PDL it lets the consumer start loading weights at once. Earlier versions were slower
than the collective kernels they replaced: v1 stored to the peers from every producer program, each adding
to a counter in the peer's memory; v2 counted locally with a system fence per program; v3 (this push) had
every consumer program poll the flag itself (benchmarks/results/runtime-h200-x2-tp-exchange-v*.json).

`epoch` counts decode steps on the device; every point is produced once per step, so counters and flags
only grow and never need a reset that could race with a fast peer. A wait that outlasts SPIN polls (a dead
peer) sets ERR and gives up instead of hanging the GPU; later waits then return at once, the step's output
is garbage, and `TPExchange.check_error` says so.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

SPIN_LIMIT = 1 << 25
"""Polls before a wait gives up (tens of seconds on an H200: ranks start their first steps seconds apart, while
one still compiles kernels); kernels take it as an argument."""

_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
"""PTX acquire loads on a GPU; Triton's interpreter (tests) runs the ranks one after another and takes an atomic."""


@triton.jit
def _load_acquire(ptr):
    if _ASM:
        return tl.inline_asm_elementwise("ld.global.acquire.sys.b64 $0, [$1];", "=l,l", [ptr], dtype=tl.int64,
                                         is_pure=False, pack=1)
    else:
        return tl.atomic_add(ptr, 0, sem="acquire", scope="sys")


@triton.jit
def wait_for_peers(FLAGS, EPOCH, RANK, ERR, SPIN, TP: tl.constexpr):
    """Block until every peer's flag FLAGS[q] (q != RANK) reaches EPOCH[0] (at most SPIN polls each)."""
    epoch = tl.load(EPOCH)
    live = tl.load(ERR) == 0  # after one wait gave up, later ones do not spin again
    for q in tl.static_range(TP):
        if (q != RANK) & live:
            n = 0
            seen = _load_acquire(FLAGS + q)
            while (seen < epoch) & (n < SPIN):
                seen = _load_acquire(FLAGS + q)
                n += 1
            if seen < epoch:
                tl.atomic_xchg(ERR, 1)
    tl.debug_barrier()  # no thread reads the slots before the flags are seen


@triton.jit
def _fence_system():
    """Every thread: its stores (to peers too) are performed system-wide before what it does next."""
    if _ASM:
        tl.inline_asm_elementwise("fence.acq_rel.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def push_when_last(SRC, N, COUNT, DST, DFLAG, EPOCH, RANK, TP: tl.constexpr, BLOCK: tl.constexpr):
    """After this program's stores into SRC (this rank's slice, its own buffer): count it on COUNT; the last
    program of the launch copies the whole slice (N elements) to every peer (DST: TP int64 addresses of the
    slice there), fences, and writes the epoch into this rank's flag on every peer (DFLAG). Programs only
    count locally; the one system fence and the remote writes are the last program's."""
    tl.debug_barrier()  # every thread's stores come before the release below
    epoch = tl.load(EPOCH)
    done = tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu")
    if done == epoch * tl.num_programs(0) - 1:
        offs = tl.arange(0, BLOCK)
        for q in tl.static_range(TP):
            if q != RANK:
                dst = tl.load(DST + q).to(tl.pointer_type(SRC.dtype.element_ty))
                for start in range(0, N, BLOCK):
                    m = start + offs < N
                    tl.store(dst + start + offs, tl.load(SRC + start + offs, mask=m, cache_modifier=".cg"), mask=m)
        _fence_system()
        tl.debug_barrier()
        for q in tl.static_range(TP):
            if q != RANK:
                tl.atomic_xchg(tl.load(DFLAG + q).to(tl.pointer_type(tl.int64)), epoch, sem="release", scope="sys")


@triton.jit
def _wait_kernel(FLAGS, EPOCH, RANK, ERR, SPIN, TP: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # the consumer may launch (and load its first weight tiles) at once; it waits for this kernel
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    wait_for_peers(FLAGS, EPOCH, RANK, ERR, SPIN, TP)


def wait(flags, epoch, rank: int, err, tp: int, pdl: bool, spin: int = SPIN_LIMIT) -> None:
    """A one-program kernel (one warp polls): the stream continues once every peer's producer has raised its
    flag to the epoch. Consumers do not poll themselves: hundreds of programs polling one flag slowed the
    step (v3 in the module docstring)."""
    _wait_kernel[(1,)](flags, epoch, rank, err, spin, TP=tp, PDL=pdl, launch_pdl=pdl, num_warps=1)
