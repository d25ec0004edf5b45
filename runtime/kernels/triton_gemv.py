"""Batch-1 decode GEMVs in Triton-lang with their neighbours fused in: one kernel per projection.

y = W x for one token (x: (K,), W: (N, K) row-major, bf16/fp16/fp32), with optional
- NORM: x is RMSNorm(x) * norm_weight: every program sums x's squares in the same pass over K and scales
  its dot products by 1/rms at the end (so the normalized x is never rounded to bf16, the one difference
  from the reference), and the norm before qkv, gate/up and lm_head costs no kernel or pass of its own;
- SWIGLU: W is the fused [fc; gate] (2I, K) of runtime/model/layers.py; the program reads rows n and I + n and
  writes silu(fc x) * (gate x) (I,);
- BIAS: y + b (Qwen2's qkv bias);
- RESIDUAL: y + r, so o_proj and down write the new residual stream (for tp > 1 only rank 0 adds it, and
  the all-reduce of the partials yields h + sum of the partials);
- OUT_F32: the bf16-rounded result stored as float32 (the logits).
Each program owns BLOCK_N outputs and walks K in BLOCK_K steps with a (BLOCK_N, BLOCK_K) float32
accumulator reduced once at the end. Roundings otherwise follow the unfused reference (`gemv_ref`):
the GEMV output is rounded before silu and before the residual add. Launch configs per shape come from
`config_for` (tuned on an H200 by benchmarks/kernels/gemv_kernels.py) or from ENGINESMITH_GEMV_CONFIGS (a JSON
file of that benchmark).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from enginesmith.runtime.kernels.pdl import wait_then_release
from enginesmith.runtime.parallel.tp_signal import HANDOFF, await_landed, clear, scatter

POLL_ENV = "ENGINESMITH_TP_EXCHANGE_POLL"


@triton.jit
def _row_dots(X, NW, rows, rows2, mask_n, K, NORM: tl.constexpr, TWO: tl.constexpr, EVEN_N: tl.constexpr,
              EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K loop of the MoE kernels (runtime/kernels/triton_moe_gemv.py): (rows . x, rows2 . x (TWO; else 0.0), sum
    of x^2 (NORM; else 0.0)) in float32, with x * NW when NORM (the caller scales by 1/rms). rows / rows2:
    (BLOCK_N, 1) pointers to each row's first element. _gemv_kernel keeps its own copy of this loop: routed
    through this helper, the dense batch-1 decode step ran 5% slower on an H200 (219-222 vs 232-234 tok/s,
    alternating in one run; cause not found), so the copy stays until a profile explains it."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if TWO:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if NORM:
        ss = tl.zeros([BLOCK_K], tl.float32)
    if PREFETCH:  # the first tiles; each iteration then loads the next before using the current
        w_next = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
        if TWO:
            w2_next = tl.load(rows2 + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            x = tl.load(X + kk).to(tl.float32)
        else:
            x = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
        if NORM:  # sum of squares in the same pass; 1/rms scales the dot products at the end
            ss += x * x
            if EVEN_K:
                x = x * tl.load(NW + kk).to(tl.float32)
            else:
                x = x * tl.load(NW + kk, mask=kk < K, other=0.0).to(tl.float32)
        xf = x[None, :]
        if PREFETCH:
            w = w_next
            nk = kk + BLOCK_K
            w_next = tl.load(rows + nk[None, :], mask=mask_n[:, None] & (nk < K)[None, :], other=0.0)
        elif EVEN_N and EVEN_K:
            w = tl.load(rows + kk[None, :])
        else:
            w = tl.load(rows + kk[None, :], mask=mask_n[:, None] & (kk < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * xf
        if TWO:
            if PREFETCH:
                w2 = w2_next
                w2_next = tl.load(rows2 + nk[None, :], mask=mask_n[:, None] & (nk < K)[None, :], other=0.0)
            elif EVEN_N and EVEN_K:
                w2 = tl.load(rows2 + kk[None, :])
            else:
                w2 = tl.load(rows2 + kk[None, :], mask=mask_n[:, None] & (kk < K)[None, :], other=0.0)
            acc2 += w2.to(tl.float32) * xf
    y2 = 0.0
    if TWO:
        y2 = tl.sum(acc2, 1)
    sq = 0.0
    if NORM:
        sq = tl.sum(ss, 0)
    return tl.sum(acc, 1), y2, sq


@triton.jit
def _silu_mul(act, lin, act_ty: tl.constexpr):
    """silu(act) * lin with runtime/model/layers.py swiglu's roundings (act and lin already rounded)."""
    silu = (act / (1.0 + tl.exp(-act))).to(act_ty).to(tl.float32)
    return (silu * lin).to(act_ty).to(tl.float32)


@triton.jit
def with_residual(y, RES, offs, mask, act_ty: tl.constexpr, RESIDUAL: tl.constexpr):
    """y (float32, rounded to act_ty already) plus the residual at RES + offs (RESIDUAL), rounded again as the
    unfused add rounds."""
    if RESIDUAL:
        y = (tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32) + y).to(act_ty).to(tl.float32)
    return y


@triton.jit
def residual_store(y, RES, OUT, offs, mask, act_ty: tl.constexpr, RESIDUAL: tl.constexpr, OUT_F32: tl.constexpr):
    """Store with_residual(y) at OUT + offs, as float32 (OUT_F32) or in OUT's dtype."""
    y = with_residual(y, RES, offs, mask, act_ty, RESIDUAL)
    if OUT_F32:
        tl.store(OUT + offs, y, mask=mask)
    else:
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(X, W, NW, B, RES, OUT, N, K, HALF, eps, COS, SIN, SLOT, KC, VC, stride_slot,
                 XS, XSET, DST, DSET, EPOCH, ERR, SPIN, READY,
                 NORM: tl.constexpr, SWIGLU: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                 OUT_F32: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
                 ROPE: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr, HEAD_D: tl.constexpr,
                 PDL: tl.constexpr, XSUM: tl.constexpr, SCATTER: tl.constexpr, TP: tl.constexpr,
                 XCHUNKS: tl.constexpr, XHANDOFF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    if ROPE:  # rows j and j + HEAD_D / 2 of one head: BLOCK_N / 2 rotary pairs per program
        t = tl.arange(0, BLOCK_N)
        offs_n = (pid // (HEAD_D // BLOCK_N)) * HEAD_D + (pid % (HEAD_D // BLOCK_N)) * (BLOCK_N // 2) \
            + t % (BLOCK_N // 2) + (t // (BLOCK_N // 2)) * (HEAD_D // 2)
    else:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    act_ty = X.dtype.element_ty
    rows = W + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if SWIGLU:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if NORM:
        ss = tl.zeros([BLOCK_K], tl.float32)
    if PREFETCH:  # the first tiles; each iteration then loads the next before using the current
        w_next = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
        if SWIGLU:
            w2_next = tl.load(rows + HALF * K + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                              other=0.0)
    if XSUM:  # no griddepcontrol.wait: all it reads of the kernel before (its own rank's partial too) lands in
        # the slots, which it polls, so it starts summing while that kernel's tail and stores are in flight
        # (1.3% off the tp=2 batch-1 step on 2 x H100, logits bit for bit the same)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
    else:
        wait_then_release(PDL)  # the first tiles above are in flight while the previous kernel finishes
    if XSUM or SCATTER:
        epoch = tl.load(EPOCH)
    if XSUM:  # this step's set of the slots, once every rank's partial has landed; the set after it is
        # emptied for the step after this one
        xs = XS + (epoch % 3) * XSET
        clear(XS + ((epoch + 1) % 3) * XSET, TP * K, BLOCK_K)
        await_landed(xs, TP * K, tl.load(ERR) == 0, ERR, SPIN, READY, (epoch + 1).to(tl.int32), BLOCK_K, XCHUNKS,
                     XHANDOFF)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if XSUM:  # x = the TP ranks' partials in the slots (TP, K) summed in rank order (every rank gets the
            # same bits), rounded once like an all-reduce
            x = tl.load(xs + kk, mask=kk < K, other=0.0, cache_modifier=".cg").to(tl.float32)
            for q in tl.static_range(1, TP):
                x += tl.load(xs + q * K + kk, mask=kk < K, other=0.0, cache_modifier=".cg").to(tl.float32)
            x = x.to(act_ty).to(tl.float32)
            if pid == 0:  # the summed residual stream, for the next residual GEMV
                tl.store(X + kk, x.to(act_ty), mask=kk < K)
        elif EVEN_K:
            x = tl.load(X + kk).to(tl.float32)
        else:
            x = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
        if NORM:  # sum of squares in the same pass; 1/rms scales the dot products at the end
            ss += x * x
            if EVEN_K:
                x = x * tl.load(NW + kk).to(tl.float32)
            else:
                x = x * tl.load(NW + kk, mask=kk < K, other=0.0).to(tl.float32)
        xf = x[None, :]
        if PREFETCH:
            w = w_next
            nk = kk + BLOCK_K
            w_next = tl.load(rows + nk[None, :], mask=mask_n[:, None] & (nk < K)[None, :], other=0.0)
        elif EVEN_N and EVEN_K:
            w = tl.load(rows + kk[None, :])
        else:
            w = tl.load(rows + kk[None, :], mask=mask_n[:, None] & (kk < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * xf
        if SWIGLU:
            if PREFETCH:
                w2 = w2_next
                w2_next = tl.load(rows + HALF * K + nk[None, :], mask=mask_n[:, None] & (nk < K)[None, :],
                                  other=0.0)
            elif EVEN_N and EVEN_K:
                w2 = tl.load(rows + HALF * K + kk[None, :])
            else:
                w2 = tl.load(rows + HALF * K + kk[None, :], mask=mask_n[:, None] & (kk < K)[None, :], other=0.0)
            acc2 += w2.to(tl.float32) * xf
    scale = 1.0
    if NORM:
        scale = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    y = tl.sum(acc, 1) * scale
    if BIAS:
        y += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = y.to(act_ty).to(tl.float32)
    if ROPE:
        _rope_store(y, pid, OUT, COS, SIN, SLOT, KC, VC, stride_slot, NQ, NKV, HEAD_D, BLOCK_N)
        return
    if SWIGLU:
        y = _silu_mul(y, (tl.sum(acc2, 1) * scale).to(act_ty).to(tl.float32), act_ty)
    if SCATTER:  # to this rank's slot on every rank (OUT: its own, for the dtype), this step's set
        scatter(with_residual(y, RES, offs_n, mask_n, act_ty, RESIDUAL).to(OUT.dtype.element_ty), offs_n, mask_n,
                DST, (epoch % 3) * DSET, TP)
    else:
        residual_store(y, RES, OUT, offs_n, mask_n, act_ty, RESIDUAL, OUT_F32)


@triton.jit
def _rope_store(y, pid, QOUT, COS, SIN, SLOT, KC, VC, stride_slot,
                NQ: tl.constexpr, NKV: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """y holds rows j (first half) and j + HEAD_D / 2 (second half) of one head of the qkv projection: rotate
    query and key heads (GPT-NeoX halves, float32, one rounding at the store) and write a query head to
    QOUT (1, NQ, HEAD_D), a key or value head straight into the cache layers at flat slot SLOT[0]."""
    head = pid // (HEAD_D // BLOCK_N)
    j = (pid % (HEAD_D // BLOCK_N)) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    ya, yb = tl.split(tl.permute(tl.reshape(y, [2, BLOCK_N // 2]), [1, 0]))
    ca = tl.load(COS + j).to(tl.float32)
    cb = tl.load(COS + j + HEAD_D // 2).to(tl.float32)
    sa = tl.load(SIN + j).to(tl.float32)
    sb = tl.load(SIN + j + HEAD_D // 2).to(tl.float32)
    rotate = head < NQ + NKV
    oa = tl.where(rotate, ya * ca - yb * sa, ya)
    ob = tl.where(rotate, yb * cb + ya * sb, yb)
    slot = tl.load(SLOT).to(tl.int64)
    if head < NQ:
        base = QOUT + head * HEAD_D
    elif head < NQ + NKV:
        base = KC + slot * stride_slot + (head - NQ) * HEAD_D
    else:
        base = VC + slot * stride_slot + (head - NQ - NKV) * HEAD_D
    tl.store(base + j, oa.to(QOUT.dtype.element_ty))
    tl.store(base + j + HEAD_D // 2, ob.to(QOUT.dtype.element_ty))


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    prefetch: bool = False
    """Load the next K tile before multiplying the current one (two tiles in flight per program)."""

    def key(self) -> str:
        return f"{'pf-' if self.prefetch else ''}n{self.block_n}-k{self.block_k}-w{self.num_warps}-s{self.num_stages}"


DEFAULT = GemvConfig(4, 1024, 4, 1, prefetch=True)
"""Used for shapes the tuned table has no entry for (near the best on every H200 shape of the sweep)."""

TUNED: dict[str, GemvConfig] = {
    "6144x4096": GemvConfig(16, 512, 4, 1, prefetch=True),  # qkv tp1
    "4096x4096": GemvConfig(4, 1024, 4, 1, prefetch=True),  # o_proj tp1
    "swiglu-14336x4096": GemvConfig(8, 256, 8, 1, prefetch=True),  # gate_up tp1
    "4096x14336": GemvConfig(4, 1024, 4, 1, prefetch=True),  # down tp1
    "128256x4096": GemvConfig(16, 256, 4, 1, prefetch=True),  # lm_head tp1
    "3072x4096": GemvConfig(8, 1024, 4, 1, prefetch=True),  # qkv tp2
    # qkv tp2 with rotary and the KV write (qkv_rope_gemv): the plain GEMV's config above ran it 2.8 us slower
    # than the plain GEMV (gemv-rope-h200.json; cause not profiled); this one was the fastest
    # inside the step (step-configs-h200-tp2.json)
    "rope-3072x4096": GemvConfig(2, 2048, 8, 1),
    "4096x2048": GemvConfig(8, 1024, 4, 1, prefetch=True),  # o_proj tp2 (best inside the step)
    "swiglu-7168x4096": GemvConfig(16, 512, 4, 1, prefetch=True),  # gate_up tp2
    "4096x7168": GemvConfig(4, 1024, 4, 1, prefetch=True),  # down tp2
    "64128x4096": GemvConfig(8, 256, 8, 1, prefetch=True),  # lm_head tp2
    # Mixtral experts' gate/up, two experts per launch: 545 tok/s vs 508 with the dense gate/up's config
    # (moe-up-configs-h200.json)
    "moe-swiglu-14336x4096": GemvConfig(16, 512, 4, 1, prefetch=True),
}
"""Best prefetching config per shape (`shape_key`: Llama-3-8B at tp 1 and 2) from benchmarks/kernels/gemv_kernels.py on
an H200 (benchmarks/results/gemv-kernels-h200.json). Prefetching ones only, so that a kernel launched with
PDL has its first weight tiles loading before it waits for the previous kernel: for down tp1, qkv tp2 and
o_proj tp2 a non-prefetching config was faster alone, by 0.0, 0.1 and 0.2 us. Then checked inside the
batch-1 step (benchmarks/kernels/step_configs.py, 2-5 candidates a shape, step-configs-h200[-tp2].json): every tp1 entry
and the tp2 gate/up, down and lm_head entries were already the fastest there; the tp2 o_proj entry changed and
the qkv + rotary kernel got an entry of its own (the one non-prefetching entry: it won inside the step too),
2.421 -> 2.374 ms a step for a tp=2 rank without its all-reduces (step-configs-h200-tp2-check.json)."""


def shape_key(n: int, k: int, swiglu: bool) -> str:
    return f"{'swiglu-' if swiglu else ''}{n}x{k}"


@lru_cache(maxsize=4)
def configs_from_env(var: str, cls: type) -> dict:
    """The `best` table of a tuning run's JSON named by environment variable `var`, as `cls` configs ({} unset)."""
    path = os.environ.get(var)
    if not path:
        return {}
    best = json.loads(open(path).read()).get("best", {})
    return {k: cls(**v) for k, v in best.items()}


def _file_configs() -> dict[str, GemvConfig]:
    return configs_from_env("ENGINESMITH_GEMV_CONFIGS", GemvConfig)


def config_for(n: int, k: int, swiglu: bool, moe: bool = False, rope: bool = False) -> GemvConfig:
    """moe: the MoE kernels' launch (TOP_K experts in one grid) looks for a "moe-" entry first; rope: the qkv
    kernel with rotary and the KV write in its epilogue (qkv_rope_gemv) for a "rope-" entry."""
    key = shape_key(n, k, swiglu)
    table = TUNED | _file_configs()  # the file's entries win: that is what the variable is for
    prefix = "moe-" if moe else "rope-" if rope else None
    return (table.get(prefix + key) if prefix else None) or table.get(key) or DEFAULT


def gemv(x: torch.Tensor, w: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-6,
         swiglu: bool = False, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
         out_f32: bool = False, config: GemvConfig | None = None, out: torch.Tensor | None = None,
         pdl: bool = False, recv=None, send=None) -> torch.Tensor | None:
    """x (1, K) or (K,) -> (1, N) (N = w.shape[0], or half of it with swiglu); see the module docstring.
    pdl: launch with programmatic dependent launch (runtime/kernels/pdl.py).
    TP exchange (runtime/parallel/tp_exchange.py):
    with `recv` the input is the sum of the ranks' slots (polled until they have landed) and `x` is where the
    kernel writes that sum; with `send` the output goes to every rank's exchange buffer and None is returned."""
    k = x.shape[-1]
    if x.numel() != k:
        raise ValueError(f"gemv takes one row, got x of shape {tuple(x.shape)}")
    if w.shape[1] != k or not w.is_contiguous():
        raise ValueError(f"weight {tuple(w.shape)} (contiguous) does not match x's {k} features")
    n = w.shape[0] // 2 if swiglu else w.shape[0]
    cfg = config or config_for(n, k, swiglu)
    if send is not None:
        out = send.slice_like
    elif out is None:
        out = torch.empty(1, n, dtype=torch.float32 if out_f32 else x.dtype, device=x.device)
    if recv is None:
        x = x.contiguous()
    dummy = x
    link = (recv or send).link if (recv or send) else None
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, w, norm if norm is not None else dummy, bias if bias is not None else dummy,
        residual.contiguous() if residual is not None else dummy, out, n, k, n, eps,
        dummy, dummy, dummy, dummy, dummy, 0, *exchange_args(recv, send, dummy),
        NORM=norm is not None, SWIGLU=swiglu, BIAS=bias is not None, RESIDUAL=residual is not None,
        OUT_F32=out_f32, EVEN_N=n % cfg.block_n == 0, EVEN_K=k % cfg.block_k == 0, PREFETCH=cfg.prefetch,
        ROPE=False, NQ=1, NKV=1, HEAD_D=1, PDL=pdl, XSUM=recv is not None, SCATTER=send is not None,
        TP=link.tp if link else 1, **x_poll(recv, k, cfg.block_k), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, launch_pdl=pdl)
    return None if send is not None else out


def x_poll(recv, k: int, block_k: int) -> dict[str, int]:
    """The kernel's XCHUNKS and XHANDOFF: how a consumer polls the ranks' slots (tp x k elements; tp_signal.
    await_landed's CHUNKS and HANDOFF), by ENGINESMITH_TP_EXCHANGE_POLL. "seq" (default): every program chunk
    after chunk; "vec": every program all chunks at once; "handoff": program 0 all at once, the others wait for
    its ready word. In isolation the exchange point costs 5.8 / 1.3 / 0.6 us, but in the 32-layer tp=2 step
    "seq" is the fastest (3.08 vs 3.19 ms for "handoff", 2 x H200; benchmarks/kernels/exchange_latency.py,
    exchange-latency-h200.json). 1 and 0 without recv (unused)."""
    if recv is None:
        return dict(XCHUNKS=1, XHANDOFF=0)
    return poll_switches(os.environ.get(POLL_ENV, "seq"), recv.link.tp * k, block_k)


def poll_switches(mode: str, n: int, block: int) -> dict[str, int]:
    """XCHUNKS and XHANDOFF for polling n slot elements in `block`-sized chunks the way `mode` names (x_poll)."""
    chunks = triton.cdiv(n, block)
    way = {"vec": (chunks, 0), "handoff": (chunks, HANDOFF.value)}.get(mode, (0, 0))
    return dict(XCHUNKS=way[0], XHANDOFF=way[1])


def exchange_args(recv, send, dummy: torch.Tensor) -> tuple:
    """The kernel's XS, XSET, DST, DSET, EPOCH, ERR, SPIN, READY arguments (dummies where unused)."""
    link = (recv or send).link if (recv or send) else None
    if link is None:
        return dummy, 0, dummy, 0, dummy, dummy, 0, dummy
    xs, xset, ready = (recv.slots, recv.set_stride, recv.ready) if recv else (dummy, 0, dummy)
    dst, dset = (send.dst, send.set_stride) if send else (dummy, 0)
    return xs, xset, dst, dset, link.epoch, link.err, link.spin, ready


def qkv_rope_gemv(x: torch.Tensor, w: torch.Tensor, norm: torch.Tensor, eps: float, bias: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, nq: int, nkv: int, d: int, config: GemvConfig | None = None,
                  pdl: bool = False, recv=None) -> torch.Tensor:
    """RMSNorm, the fused qkv projection of one token, rotary of q and k, and the write of k and v into the
    cache layers (blocks, tpb, nkv, d) at flat slot slots[0], in one kernel -> rotated q (1, nq, d).
    The arithmetic of gemv(norm, bias) followed by runtime/decode_rope_write.rope_cache_write_ref.
    pdl and recv as in gemv (with recv, x receives the summed input)."""
    why = rope_unsupported(w, k_cache, v_cache, nq, nkv, d, x.dtype)
    if why:
        raise ValueError(f"qkv_rope_gemv: {why}")
    k, n = x.shape[-1], w.shape[0]
    cfg = config or config_for(n, k, False, rope=True)
    block_n = max(2, min(cfg.block_n, d))  # a program covers whole rotary pairs of one head
    q = torch.empty(1, nq, d, dtype=x.dtype, device=x.device)
    if recv is None:
        x = x.contiguous()
    _gemv_kernel[(n // block_n,)](
        x, w, norm, bias if bias is not None else x, x, q, n, k, n, eps,
        cos.contiguous(), sin.contiguous(), slots, k_cache, v_cache, nkv * d, *exchange_args(recv, None, x),
        NORM=True, SWIGLU=False, BIAS=bias is not None, RESIDUAL=False, OUT_F32=False, EVEN_N=True,
        EVEN_K=k % cfg.block_k == 0, PREFETCH=cfg.prefetch, ROPE=True, NQ=nq, NKV=nkv, HEAD_D=d,
        PDL=pdl, XSUM=recv is not None, SCATTER=False, TP=recv.link.tp if recv else 1,
        **x_poll(recv, k, cfg.block_k), BLOCK_N=block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, launch_pdl=pdl)
    return q


def rope_unsupported(w: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, nq: int, nkv: int,
                     d: int, dtype: torch.dtype) -> str | None:
    """None when qkv_rope_gemv handles these tensors, else why not."""
    if d < 2 or d & (d - 1):
        return f"head_size={d} is not a power of two"
    if w.shape[0] != (nq + 2 * nkv) * d or not w.is_contiguous():
        return f"qkv weight {tuple(w.shape)} is not ({nq} + 2 x {nkv}) x {d} rows, contiguous"
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape[-2:] != (nkv, d):
        return "cache layers are not contiguous (blocks, tpb, nkv, d)"
    if not k_cache.dtype == v_cache.dtype == dtype:
        return f"cache layers ({k_cache.dtype}, {v_cache.dtype}) are not the activations' {dtype}"
    return None
