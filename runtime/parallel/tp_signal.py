"""Cross-rank signalling for the TP exchange (runtime/parallel/tp_exchange.py): the data is its own flag.

Every element of an exchange slot starts as -0.0 (the sign bit alone: "empty"). A producer program (o_proj,
down, lm_head on every TP rank) stores its outputs straight into its slot on every rank, the peers' over
NVLink, turning a -0.0 result into +0.0 so that no real value reads as empty. A consumer program reads its
own buffer once with vectorized L2 loads and, if some element it needs is still empty, polls (volatile loads)
until none is. There is no counter, fence,
flag or wait kernel: a slot is ready element by element, the moment the peer's stores land (the Lamport
scheme of TensorRT-LLM's low-latency all-reduce). The producer and the consumer are the GEMVs themselves
(mode "fused"), or a small kernel of this module (`reduce`) is both (mode "kernel", the default) or the
consumer only ("split").

Slots come in three sets that rotate with the step epoch (on the device, one per decode step): step e writes
and reads set e % 3, and its consumers (each point's reader) empty set (e + 1) % 3 again. That set was last
read at step e - 2; it is next written at step e + 1, and a peer can only get that far after it has consumed
this rank's later outputs of step e, which this rank produces after the clear.

Earlier versions were slower than the collective kernels they replaced (benchmarks/results/
runtime-h200-x2-tp-exchange-v*.json): v1 stored to the peers from every producer program, each adding to a
counter in the peer's memory; v2 counted locally with a system fence per program; v3 had every consumer
program poll a flag the producer's last program raised after pushing the slot; v4 polled that flag in a
one-warp wait kernel before the consumer. The counter, the fence and the serial push are what this version
(v5) drops; it ties with the one-shot all-reduce (runtime/parallel/tp_exchange.py). What getting there taught: the
set-up check must fill every element of a slot (it once wrote 2048 of lm_head's columns and its gather waited
for the rest until the poll gave up); polling every K tile of a GEMV element by element made the step 5x
slower (runtime-h200-x2-tp*-device-fed.json, their "1_exchange" rows), hence one vectorized pass over the
slots before the K loop and per-element polls only for what had not landed. That slow version's tokens also
drifted from the default path's (logits off by ~0.03 at some steps in a teacher-forced probe; cause not
found); this one matched the collective path bit for bit in the probe (benchmarks/kernels/tp_exchange_check.py) and
gave the same greedy tokens in all three tp-section runs.

A poll that outlasts SPIN rounds (a dead peer) sets ERR[0] and gives up instead of hanging the GPU; later polls
return at once, the step's output is garbage, and `TPExchange.check_error` says so.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
"""PTX loads on a GPU; Triton's interpreter (tests) takes tl.load."""

HANDOFF = tl.constexpr(4096)
"""Rounds a consumer program other than program 0 polls the exchange point's ready word before it polls the
slots itself (program 0 may not be running yet; ~0.5 ms)."""

SPIN_LIMIT = 1 << 25
"""Polls before a consumer gives up (tens of seconds on an H200: ranks start their first steps seconds apart,
while one still compiles kernels); kernels take it as an argument."""


@triton.jit
def _bits(P):
    """P recast to the signed integer of its element's width (float32 -> int32, 16-bit floats -> int16)."""
    if P.dtype.element_ty == tl.float32:
        return P.to(tl.pointer_type(tl.int32), bitcast=True)
    else:
        return P.to(tl.pointer_type(tl.int16), bitcast=True)


@triton.jit
def _empty_bits(B):
    """The bit pattern of -0.0 (the sign bit alone) at integer pointer B's width."""
    if B.dtype.element_ty == tl.int32:
        return -2147483648
    else:
        return -32768


@triton.jit
def _load_volatile(B, offs, mask):
    """B[offs] (integers) read from memory every time: PTX ld.volatile as inline asm with side effects, which
    no compiler pass may hoist out of a polling loop or merge with an earlier load (tl.load(volatile=True)
    carries no such promise through Triton's loop-invariant code motion); masked lanes read B[0] and give 0."""
    safe = B + tl.where(mask, offs, 0)
    if _ASM:
        if B.dtype.element_ty == tl.int32:
            v = tl.inline_asm_elementwise("ld.volatile.global.b32 $0, [$1];", "=r,l", [safe], dtype=tl.int32,
                                          is_pure=False, pack=1)
        else:
            v = tl.inline_asm_elementwise("ld.volatile.global.b16 $0, [$1];", "=h,l", [safe], dtype=tl.int16,
                                          is_pure=False, pack=1)
    else:
        v = tl.load(safe, volatile=True)
    return tl.where(mask, v, 0)


@triton.jit
def _backoff():
    """A short sleep between poll rounds (PTX nanosleep), so waiting programs leave issue slots and L2 to the
    kernels still producing."""
    if _ASM:
        tl.inline_asm_elementwise("nanosleep.u32 32; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def _spin(B, offs, mask, live, ERR, SPIN):
    """Poll B[offs] (volatile loads) until none is empty; at most SPIN rounds, then ERR[0] is set. ERR[1] adds
    the rounds spent, a statistic (TPExchange.status)."""
    empty = _empty_bits(B)
    v = _load_volatile(B, offs, mask)
    if live:
        n = 0
        while (tl.max((v == empty).to(tl.int32), 0) > 0) & (n < SPIN):
            _backoff()
            v = _load_volatile(B, offs, mask)
            n += 1
        if n > 0:
            tl.atomic_add(ERR + 1, n)
        if tl.max((v == empty).to(tl.int32), 0) > 0:
            tl.atomic_xchg(ERR, 1)


@triton.jit
def _any_empty(B, N, offs, salt, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """Whether some element of B[0:N] is empty: CHUNKS BLOCK-sized chunks of vectorized L2 loads (ld.global.cg),
    unrolled so that all are in flight at once. `salt` is 0, but the compiler cannot know it (a multiple of 8
    read from memory): a polling loop passes a value that changes every round, so no pass hoists or merges
    the loads, and they stay 16-byte vectors (volatile loads are one element each: 8x the requests)."""
    bad = tl.zeros([BLOCK], tl.int32)
    for c in tl.static_range(CHUNKS):
        o = c * BLOCK + offs
        v = tl.load(B + salt + o, mask=o < N, other=0, cache_modifier=".cg")
        bad = bad | (v == _empty_bits(B)).to(tl.int32)
    return tl.max(bad, 0) > 0


@triton.jit
def _poll_slots(B, N, offs, ERR, SPIN, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """Poll B[0:N] until nothing is empty (SPIN rounds at most, then ERR[0] is set; ERR[1] adds the rounds)."""
    missing = _any_empty(B, N, offs, 0, CHUNKS, BLOCK)
    if missing:
        zero = tl.load(ERR + 2)  # stays 0: the opaque salt of each round
        n = 0
        while missing & (n < SPIN):
            _backoff()
            n += 1
            missing = _any_empty(B, N, offs, n * zero * 8, CHUNKS, BLOCK)
        tl.atomic_add(ERR + 1, n)
        if missing:
            tl.atomic_xchg(ERR, 1)


@triton.jit
def await_landed(P, N, live, ERR, SPIN, READY, e, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
                 HANDOFF: tl.constexpr):
    """Return once P[0:N] (this rank's buffer) holds no empty element; `live`: no earlier poll gave up (else
    return at once). The caller then reads P with .cg loads: landed data sits in L2, and no stale L1 line is read.
    Three ways (runtime/triton_gemv.x_poll picks one for the GEMVs; the logits gather takes the second):
    - CHUNKS = 0 (the step's default): one pass of L2 loads chunk after chunk, then, only for what had not
      landed, chunk by chunk polls with one-element volatile loads.
    - CHUNKS = cdiv(N, BLOCK), HANDOFF = 0: every round reads all of P[0:N] at once (16-byte L2 loads), until
      nothing is empty (SPIN rounds at most, then ERR[0] is set; ERR[1] adds the rounds).
    - the same with HANDOFF > 0, READY (a word of this rank's per exchange point, 0 after a reset) and the
      step's tag e (>= 1, new every step): program 0 alone polls the slots and then stores e into READY; the
      other programs poll that one word, and only after HANDOFF rounds without it poll the slots themselves.
    Between kernels that only exchange (benchmarks/kernels/exchange_latency.py, 2 x H200) a point costs 5.8, 1.3 and
    0.6 us over the same kernels on one GPU (NVLink's one-way latency: 0.7 us); between the step's GEMVs the
    first is the fastest (32 layers: 3.08 ms a step against 3.19 ms with the handoff)."""
    B = _bits(P)
    offs = tl.arange(0, BLOCK)
    if CHUNKS == 0:
        bad = tl.zeros([BLOCK], tl.int32)
        for s in range(0, N, BLOCK):
            v = tl.load(B + s + offs, mask=s + offs < N, other=0, cache_modifier=".cg")
            bad = bad | (v == _empty_bits(B)).to(tl.int32)
        if tl.max(bad, 0) > 0:
            for s in range(0, N, BLOCK):
                _spin(B, s + offs, s + offs < N, live, ERR, SPIN)
    elif HANDOFF == 0:
        if live:
            _poll_slots(B, N, offs, ERR, SPIN, CHUNKS, BLOCK)
    elif live:
        if tl.program_id(0) == 0:
            _poll_slots(B, N, offs, ERR, SPIN, CHUNKS, BLOCK)
            tl.atomic_xchg(READY, e)
        else:
            one = tl.arange(0, 2) < 1
            r = tl.max(_load_volatile(READY, tl.arange(0, 2), one), 0)
            n = 0
            while (r != e) & (n < HANDOFF):
                _backoff()
                r = tl.max(_load_volatile(READY, tl.arange(0, 2), one), 0)
                n += 1
            if r != e:
                _poll_slots(B, N, offs, ERR, SPIN, CHUNKS, BLOCK)


@triton.jit
def scatter(v, offs, mask, DST, shift, TP: tl.constexpr):
    """Store v (in the slot's dtype) at offs of this rank's slot on every rank: DST[q] is its address in rank
    q's buffer (set 0), `shift` the elements to the step's set. A -0.0 is stored as +0.0."""
    for q in tl.static_range(TP):
        B = _bits(tl.load(DST + q).to(tl.pointer_type(v.dtype)))
        bits = v.to(B.dtype.element_ty, bitcast=True)
        bits = tl.where(bits == _empty_bits(B), 0, bits)
        tl.store(B + shift + offs, bits, mask=mask)


@triton.jit
def clear(P, N, BLOCK: tl.constexpr):
    """Mark P[0:N] empty again, the launch's programs taking BLOCK-sized chunks in turn."""
    B = _bits(P)
    offs = tl.arange(0, BLOCK)
    empty = tl.full([BLOCK], _empty_bits(B), B.dtype.element_ty)
    for s in range(tl.program_id(0) * BLOCK, N, tl.num_programs(0) * BLOCK):
        tl.store(B + s + offs, empty, mask=s + offs < N)


@triton.jit
def slot_sum(XS, N, offs, mask, TP: tl.constexpr):
    """float32 sum, in rank order, of XS[q * N + offs] over the TP slots (landed: read with .cg from L2)."""
    s = tl.load(XS + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    for q in tl.static_range(1, TP):
        s += tl.load(XS + q * N + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return s


@triton.jit
def _reduce_kernel(X, OUT, DST, DSET, XS, XSET, EPOCH, ERR, SPIN, N, PDL: tl.constexpr, EARLY: tl.constexpr,
                   SCATTER: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr):
    """One all-reduce point as a kernel of its own: program p stores its BLOCK of this rank's partial X into
    every rank's slot (SCATTER; else the producer GEMV has stored its outputs there itself, and this kernel
    does not wait for it), empties its share of the next set, polls its BLOCK of every rank's slot until
    landed, and writes their sum (float32, rank order, rounded once) to OUT. EARLY: its dependents (the next
    GEMV) launch as soon as it starts, so they load their first weight tiles while the partials cross."""
    if PDL:
        if SCATTER:
            tl.extra.cuda.gdc_wait()
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
    epoch = tl.load(EPOCH)
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < N
    if SCATTER:
        scatter(tl.load(X + offs, mask=mask, other=0.0), offs, mask, DST, (epoch % 3) * DSET, TP)
    clear(XS + ((epoch + 1) % 3) * XSET, TP * N, BLOCK)
    xs = XS + (epoch % 3) * XSET
    for q in tl.static_range(TP):
        await_landed(xs + q * N + start, tl.minimum(N - start, BLOCK), tl.load(ERR) == 0, ERR, SPIN, ERR, 0, BLOCK,
                     1, 0)
    tl.store(OUT + offs, slot_sum(xs, N, offs, mask, TP).to(OUT.dtype.element_ty), mask=mask)
    if PDL:
        if not EARLY:
            tl.extra.cuda.gdc_launch_dependents()


def reduce(x, out, slots, dst, set_stride: int, link, pdl: bool, early: bool = True, block: int = 512) -> None:
    """out = the sum over the TP ranks of x (this rank's partial, n elements) through one exchange point:
    `slots` (tp, n) of this rank's buffer (set 0), `dst` (tp,) the addresses of this rank's slot on every rank.
    x None: the producer has stored this rank's partial into the slots itself (a GEMV with `send`)."""
    n = out.numel()
    _reduce_kernel[(triton.cdiv(n, block),)](out if x is None else x, out, dst, set_stride, slots, set_stride,
                                             link.epoch, link.err, link.spin, n, PDL=pdl, EARLY=early,
                                             SCATTER=x is not None, TP=link.tp, BLOCK=block, launch_pdl=pdl,
                                             num_warps=4)


@triton.jit
def _gather_kernel(SRC, OUT, N, SET, EPOCH, ERR, SPIN, PDL: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[0:N] = this step's set of SRC (every rank's slice, in rank order) once it is complete; then the
    set after it emptied."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    epoch = tl.load(EPOCH)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    src = SRC + (epoch % 3) * SET
    await_landed(src + tl.program_id(0) * BLOCK, tl.minimum(N - tl.program_id(0) * BLOCK, BLOCK),
                 tl.load(ERR) == 0, ERR, SPIN, ERR, 0, BLOCK, 1, 0)
    tl.store(OUT + offs, tl.load(src + offs, mask=mask, cache_modifier=".cg"), mask=mask)
    clear(SRC + ((epoch + 1) % 3) * SET, N, BLOCK)  # one BLOCK per program: this program's share


def gather(src, out, n: int, set_stride: int, epoch, err, spin: int, pdl: bool, block: int = 2048) -> None:
    """out[:n] = the step's complete set of src (one float32 row of every rank's slice), as a kernel."""
    _gather_kernel[(triton.cdiv(n, block),)](src, out, n, set_stride, epoch, err, spin, PDL=pdl, BLOCK=block,
                                              launch_pdl=pdl, num_warps=4)
