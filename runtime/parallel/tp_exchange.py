"""The TP all-reduces and the logits all-gather of the batch-1 decode step, through peer memory.

With tp > 1 the GemvDecode step (runtime/fast/decode_gemv_step.py) reduces twice per layer: after o_proj and
after down. Instead of the one-shot all-reduce kernel (runtime/parallel/fast_allreduce.py), each of these points goes
through slots in every rank's buffer: a rank stores its partial (rank 0's with the residual added) into its
slot on every rank, the peers' over NVLink, and a reader polls its own buffer until the peers' slots have
landed (a slot element is "empty" while it holds -0.0: runtime/parallel/tp_signal.py), then sums the slots in rank
order (float32, rounded once: the same bits as the all-reduce). lm_head's vocab slices reach every rank's
logits row the same way, and a small kernel copies the row out once it is complete. No host sync, wait kernel
or end-of-collective barrier is left in the step. Three modes (`TPExchange.mode`, ENGINESMITH_TP_EXCHANGE):

- "kernel" (the default): a small kernel per point (tp_signal.reduce, 8 programs) between plain GEMVs: it waits
  for the producer GEMV (PDL), lets the consumer GEMV launch at once (so it loads its first weight tiles while
  the partials cross), scatters, polls, sums. 3.5-3.9 us a point over no exchange between the step's real
  GEMVs vs 8.3-8.7 us for the one-shot all-reduce (benchmarks/kernels/exchange_latency.py, 2 x H200), and the
  Llama-3-8B tp=2 batch-1 step 2.63 vs 2.94 ms with every logit bit for bit equal
  (tp-exchange-check-modes-h200.json); in the tp section 1.55x over tp=1 against 1.39x
  (runtime-h200-x2-tp-exchange-kernels.json).
- "split" ("split"): the producer GEMV stores its outputs into the slots itself and the small kernel only polls
  and sums (no wait on the producer): cheaper alone (2.6-2.8 us a point), slower in the step (2.70 ms).
- "fused" ("1"): the consumer GEMV polls and sums the slots itself, skipping griddepcontrol.wait (everything it
  reads of the producers arrives through the slots). Bit for bit equal too, but 3.08 ms a step on 2 x H200:
  between real GEMVs a point costs 11-13 us. Versions 1-4 of it (flags and counters, see runtime/parallel/tp_signal.py)
  were 3-30% slower than the collectives; v5 tied on 2 x H100 (runtime-h100-x2-tp-exchange-v5*.json).

Buffers live in PyTorch symmetric memory (peer-mapped allocations, NVLink multicast off, as in
runtime/parallel/fast_allreduce.py): three rotating sets (one per step epoch mod 3) of one slot row per rank for each
of the step's 2 x layers points, and of the logits row. Every point is produced and consumed exactly once per
step, in the same order on every rank (TP ranks run the same steps), so `begin_step` only adds 1 to the
on-device epoch; whoever sums a point empties the point's next set.

Set-up is collective and checks the fused kernels against dist.all_reduce / all_gather on random data;
the ranks agree, and on any failure `enabled` is False with the reason (the step keeps its collectives).
ENGINESMITH_TP_EXCHANGE=0 turns the exchange off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from enginesmith.runtime.parallel import tp_signal
from enginesmith.runtime.parallel.fast_allreduce import all_ranks_ok

log = logging.getLogger(__name__)
ENV_SWITCH = "ENGINESMITH_TP_EXCHANGE"
MODES = {"kernel": "kernel", "1": "fused", "fused": "fused", "split": "split"}
"""ENGINESMITH_TP_EXCHANGE's values that turn the exchange on, and the TPExchange.mode each gives; unset means
"kernel", "0" turns the exchange off (the step keeps the one-shot all-reduce)."""
DEFAULT_MODE = "kernel"
BLOCK_ENV = "ENGINESMITH_TP_REDUCE_BLOCK"
"""Elements per program of the exchange kernels of modes "kernel" and "split" (default 512: 8 programs for a
4096-wide hidden state)."""


def _switch() -> str:
    return os.environ.get(ENV_SWITCH, DEFAULT_MODE)


def _block() -> int:
    raw = os.environ.get(BLOCK_ENV, "512")
    block = int(raw) if raw.isdigit() else 0
    if not (16 <= block <= 4096 and block & (block - 1) == 0):
        raise ValueError(f"{BLOCK_ENV}={raw!r}: give a power of two from 16 to 4096 (elements per program of the "
                         "exchange kernels), or unset it for 512")
    return block
_ALIGN = 256


@dataclass(frozen=True)
class Link:
    epoch: torch.Tensor
    """(1,) int64 on the device: decode steps begun (the slots' set is epoch % 3)."""
    err: torch.Tensor
    """(3,) int32: [0] set by a poll that gave up (a peer never delivered); [1] poll rounds spent waiting;
    [2] always 0 (the polls read it as an offset the compiler cannot fold, runtime/parallel/tp_signal.py)."""
    ready: torch.Tensor
    """(points,) int32, this rank's: a consumer's program 0 stores the step's tag (epoch + 1) into its point's
    word once every rank's partial has landed, which is what the consumer's other programs poll."""
    rank: int
    tp: int
    spin: int
    """Polls before a consumer gives up."""


@dataclass(frozen=True)
class Recv:
    """Where a consumer kernel finds its input: row q of `slots` (set 0; + set_stride per set) is rank q's."""
    slots: torch.Tensor  # (tp, n), this rank's buffer
    set_stride: int
    link: Link
    ready: torch.Tensor  # (1,) int32: the point's word of link.ready


@dataclass(frozen=True)
class Send:
    """Where a producer kernel stores its output: this rank's slice on every rank."""
    dst: torch.Tensor  # (tp,) int64 addresses of this rank's slice (set 0) in each rank's buffer
    set_stride: int  # elements from one set to the next
    slice_like: torch.Tensor  # the slice in this rank's own buffer (its shape and dtype)
    link: Link


class TPExchange:
    check_columns = 2048
    """The set-up check computes lm_head's slice in chunks of this many columns (one small random weight)."""

    def __init__(self, group, rank: int, tp: int, device: torch.device, dtype: torch.dtype, hidden: int,
                 vocab_local: int, num_points: int, *, pdl: bool = False, spin: int = tp_signal.SPIN_LIMIT):
        """Collective over `group` (the TP group; `rank` is the TP rank): allocate, rendezvous, self-check."""
        self._set(group, rank, tp, device, dtype, hidden, vocab_local, num_points, pdl, spin)
        try:
            problem = self._local_problem()
            if self._agree(problem is None, problem):
                self._stage("allocate + rendezvous", self._allocate)
            if self._buf is not None:
                self._stage("self-check", self._self_check)
        except Exception as e:  # the step still has its collectives
            self._disable(f"set-up failed: {type(e).__name__}: {str(e)[:400]}")

    @property
    def enabled(self) -> bool:
        return self._buf is not None

    def status(self) -> dict:
        out = dict(enabled=self.enabled, mode=self.mode, reason=self.reason, self_check_rel_err=self.check_err,
                   pdl=self.pdl, points=self.num_points)
        if self.enabled:  # a host sync: not inside a graph
            out["poll_rounds_waited"] = int(self.link.err[1])
        return out

    # ---- the step's view ----
    def begin_step(self) -> None:
        self.link.epoch.add_(1)

    def recv(self, point: int) -> Recv:
        """Where the consumer of `point` polls for the ranks' partials (it launches nothing itself)."""
        return Recv(self._slots[0, point], self._slot_set, self.link, self.link.ready[point: point + 1])

    def send(self, point: int) -> Send:
        return Send(self._dst[point], self._slot_set, self._slots[0, point, self.rank].view(1, -1), self.link)

    def all_reduce(self, point: int, x: torch.Tensor, early: bool = True) -> torch.Tensor:
        """`mode` "kernel": the sum of every rank's x (this rank's partial, one row) through `point`, as one
        small kernel (tp_signal.reduce) between the producer GEMV and the consumer, instead of inside them."""
        return self._reduce(point, x, torch.empty_like(x), early)

    def landed_sum(self, point: int) -> torch.Tensor:
        """`mode` "split": (1, hidden), the sum of the ranks' partials a producer GEMV stored through
        `send(point)`, as one small kernel that polls the slots (the producer scatters, no kernel waits)."""
        return self._reduce(point, None, torch.empty(1, self.hidden, dtype=self.dtype, device=self.device))

    def _reduce(self, point: int, x: torch.Tensor | None, out: torch.Tensor, early: bool = True) -> torch.Tensor:
        tp_signal.reduce(x, out, self._slots[0, point], self._dst[point], self._slot_set, self.link, self.pdl, early,
                         self.block)
        return out

    def serves(self, moe: bool) -> bool:
        """Whether a decode step uses this exchange: enabled, and (mode "fused") the model is dense."""
        return self.enabled and not (moe and self.mode == "fused")

    def send_logits(self) -> Send:
        v = self.vocab_local
        return Send(self._dst_logits, self._logit_set, self._logits[0:1, self.rank * v: (self.rank + 1) * v],
                    self.link)

    def wait_logits(self) -> torch.Tensor:
        """(1, tp x vocab_local) float32: every rank's lm_head slice, copied out (a kernel) once all have landed."""
        n = self.tp * self.vocab_local
        tp_signal.gather(self._logits, self._logits_out, n, n, self.link.epoch, self.link.err, self.spin, self.pdl)
        return self._logits_out

    def check_error(self) -> None:
        """Raise if a poll gave up (a host sync: call it between steps, not inside a graph)."""
        if int(self.link.err[0]):
            raise RuntimeError("TP exchange: a peer rank never delivered its partial (dead or out of step); "
                               "the last step's output is invalid")

    def reset(self) -> None:
        """Collective: every slot empty, the epoch and the error zero on every rank (nothing may be in flight)."""
        self._sync()
        dist.barrier(group=self.group)
        self.mark_empty(self._buf, self.tp, self.num_points, self.hidden, self.vocab_local, self.dtype)
        self.link.epoch.zero_()
        self.link.err.zero_()
        self.link.ready.zero_()
        self._sync()
        dist.barrier(group=self.group)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- set-up ----
    def _local_problem(self) -> str | None:
        if _switch() not in MODES:
            return f"off ({ENV_SWITCH}={_switch()}; kernel (the default), split or 1 (fused) turns it on)"
        if self.device.type != "cuda":
            return f"device is {self.device.type}: the TP exchange needs CUDA peer memory"
        if self.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return f"dtype {self.dtype}"
        return None

    @staticmethod
    def layout(tp: int, num_points: int, hidden: int, vocab_local: int, dtype: torch.dtype) -> tuple[list[int], int]:
        """Byte offsets of the slots (3 sets x points x ranks x hidden) and the logits rows (3 sets x ranks x
        vocab_local float32) in one rank's buffer, and its size."""
        offs, total = [], 0
        for size in (3 * num_points * tp * hidden * dtype.itemsize, 3 * tp * vocab_local * 4):
            offs.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        return offs, total

    @classmethod
    def mark_empty(cls, buf: torch.Tensor, tp: int, num_points: int, hidden: int, vocab_local: int,
                   dtype: torch.dtype) -> None:
        """Fill a `layout`-sized byte buffer with -0.0 (the "not landed yet" mark) in each region's dtype."""
        (s_off, l_off), _ = cls.layout(tp, num_points, hidden, vocab_local, dtype)
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        for off, n, es in ((s_off, 3 * num_points * tp * hidden, dtype.itemsize), (l_off, 3 * tp * vocab_local, 4)):
            ty = bits[es]
            buf[off: off + n * es].view(ty).fill_(torch.iinfo(ty).min)

    @classmethod
    def over_buffers(cls, bufs: list[torch.Tensor], rank: int, dtype: torch.dtype, hidden: int, vocab_local: int,
                     num_points: int, *, pdl: bool = False, spin: int = tp_signal.SPIN_LIMIT) -> TPExchange:
        """Rank `rank`'s exchange over every rank's byte buffer (`layout` sized, `mark_empty`-filled) in one
        address space: no collective and no self-check (tests run the ranks under Triton's interpreter)."""
        ex = cls.__new__(cls)
        ex._set(None, rank, len(bufs), bufs[rank].device, dtype, hidden, vocab_local, num_points, pdl, spin)
        ex._attach(bufs[rank], [b.data_ptr() for b in bufs])
        return ex

    def _set(self, group, rank: int, tp: int, device, dtype: torch.dtype, hidden: int, vocab_local: int,
             num_points: int, pdl: bool, spin: int) -> None:
        self.group, self.rank, self.tp, self.device, self.dtype = group, rank, tp, torch.device(device), dtype
        self.hidden, self.vocab_local, self.num_points, self.pdl, self.spin = hidden, vocab_local, num_points, pdl, spin
        self.reason, self.check_err, self._buf = "", None, None
        self.mode = MODES.get(_switch(), DEFAULT_MODE)
        """"fused": the GEMVs exchange (producers store into the slots, consumers poll them); "kernel": each
        all-reduce point is a small kernel of its own (`all_reduce`) between plain GEMVs; "split": producers
        store into the slots, a small kernel polls and sums them (`landed_sum`), consumers are plain GEMVs."""
        self.block = _block()

    def _allocate(self) -> None:
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # before any symmetric allocation: no cuMulticast*
        import torch.distributed._symmetric_memory as symm_mem

        _, total = self.layout(self.tp, self.num_points, self.hidden, self.vocab_local, self.dtype)
        buf = symm_mem.empty(total, dtype=torch.uint8, device=self.device)
        self.mark_empty(buf, self.tp, self.num_points, self.hidden, self.vocab_local, self.dtype)
        torch.cuda.synchronize(self.device)
        handle = symm_mem.rendezvous(buf, self.group.group_name)
        ptrs = [int(a) for a in handle.buffer_ptrs]
        if len(ptrs) != self.tp:
            raise RuntimeError(f"rendezvous gave {len(ptrs)} peer buffers for tp={self.tp}")
        self._handle = handle
        self._attach(buf, ptrs)
        if hasattr(handle, "barrier"):
            handle.barrier()
        torch.cuda.synchronize(self.device)

    def _attach(self, buf: torch.Tensor, ptrs: list[int]) -> None:
        """Views of this rank's buffer and the address tables of every rank's (ptrs: their base addresses)."""
        tp, p, h, v, es = self.tp, self.num_points, self.hidden, self.vocab_local, self.dtype.itemsize
        (s_off, l_off), total = self.layout(tp, p, h, v, self.dtype)
        if buf.numel() < total or buf.dtype != torch.uint8:
            raise ValueError(f"exchange buffer of {buf.numel()} {buf.dtype} elements, need {total} uint8")
        self._slots = buf[s_off: s_off + 3 * p * tp * h * es].view(self.dtype).view(3, p, tp, h)
        self._logits = buf[l_off: l_off + 3 * tp * v * 4].view(torch.float32).view(3, tp * v)
        self._slot_set, self._logit_set = p * tp * h, tp * v
        r, dev = self.rank, self.device

        def table(rows) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.int64, device=dev)

        self._dst = table([[ptrs[q] + s_off + (i * tp + r) * h * es for q in range(tp)] for i in range(p)])
        self._dst_logits = table([ptrs[q] + l_off + r * v * 4 for q in range(tp)])
        self._logits_out = torch.empty(1, tp * v, dtype=torch.float32, device=dev)
        self.link = Link(torch.zeros(1, dtype=torch.int64, device=dev), torch.zeros(3, dtype=torch.int32, device=dev),
                         torch.zeros(p, dtype=torch.int32, device=dev), r, tp, self.spin)
        self._buf = buf

    def _self_check(self) -> None:
        """One exchange step on random weights: a residual GEMV into point 0, an RMSNorm GEMV out of it into
        the logits, and the partial through point 1's reduce kernel, against the same arithmetic with
        dist.all_reduce / all_gather; then every slot emptied."""
        from enginesmith.runtime.kernels import triton_gemv
        from enginesmith.runtime.kernels.gemv_ref import check_tol, gemv_ref, rel_err

        h, v, dev, dt = self.hidden, self.vocab_local, self.device, self.dtype
        gen = torch.Generator(device="cpu").manual_seed(7 + self.rank)

        def rnd(*shape) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dev, dt)

        k_part, n_out = 256, min(v, self.check_columns)  # lm_head's check: one (n_out, h) weight per chunk
        x, res, w1, w2, norm = rnd(1, k_part), rnd(1, h), rnd(h, k_part), rnd(n_out, h), 1 + rnd(h)
        with torch.inference_mode():
            part = gemv_ref(x, w1, residual=res if self.rank == 0 else None)
            summed = part.clone()
            dist.all_reduce(summed, group=self.group)
            ref_h = summed
            chunk = gemv_ref(ref_h, w2, norm=norm, out_f32=True)
            ref_slice = torch.cat([chunk] * -(-v // n_out), -1)[:, :v]
            parts = [torch.empty_like(ref_slice) for _ in range(self.tp)]
            dist.all_gather(parts, ref_slice, group=self.group)
            ref_logits = torch.cat(parts, -1)
            self.begin_step()
            triton_gemv.gemv(x, w1, residual=res if self.rank == 0 else None, pdl=self.pdl, send=self.send(0))
            got_h = torch.empty(1, h, dtype=dt, device=dev)
            whole = self.send_logits()
            for c in range(0, v, n_out):  # every column of the slice, or the gather waits for the rest forever
                n = min(n_out, v - c)
                triton_gemv.gemv(got_h, w2[:n], norm=norm, out_f32=True, pdl=self.pdl, recv=self.recv(0),
                                 send=Send(whole.dst + 4 * c, whole.set_stride, whole.slice_like[:, c: c + n],
                                           self.link))
            logits = self.wait_logits().clone()
            errs = [rel_err(got_h, ref_h), rel_err(logits, ref_logits)]
            if self.num_points > 1:  # the reduce kernel of modes kernel / split, through the next point
                errs.append(rel_err(self.all_reduce(1, part), ref_h))
            self._sync()
        self.check_error()
        self.check_err = max(errs)
        self.reset()
        if not self.check_err < check_tol(dt):
            raise RuntimeError(f"relative error {self.check_err:.3g} against dist.all_reduce / all_gather")

    def _stage(self, name: str, fn) -> None:
        err = None
        try:
            fn()
        except Exception as e:
            err = f"{name} failed: {type(e).__name__}: {str(e)[:400]}"
        self._agree(err is None, err or f"{name} failed on another rank")

    def _agree(self, ok: bool, reason: str | None) -> bool:
        """All ranks ok (MIN over the group)? If not, disable everywhere, naming this rank's reason."""
        if all_ranks_ok(self.group, ok, self.device):
            return True
        self._disable(reason if not ok else "another rank could not set up the TP exchange")
        return False

    def _disable(self, reason: str) -> None:
        self.reason, self._buf = reason, None
        log.warning("TP exchange off, the decode step keeps its all-reduces: %s", reason)


def for_model(groups, model, device: torch.device) -> TPExchange:
    """The exchange a single-stage TP rank's batch-1 decode step needs (collective over the TP group)."""
    from enginesmith.runtime.kernels import pdl

    return TPExchange(groups.tp_group, groups.coords.tp_rank, groups.mapping.tp_size, device, model.dtype,
                      model.cfg.hidden_size, model.lm_head.shape[0], 2 * model.num_local_layers,
                      pdl=pdl.enabled(device))
