"""The TP all-reduces and the logits all-gather of the batch-1 decode step, fused into the GEMV kernels.

With tp > 1 the GemvDecode step (runtime/decode_gemv_step.py) reduces twice per layer: after o_proj and
after down. Instead of a collective kernel there, the producer GEMV stores its partial (rank 0's with the
residual added) into its slot of the exchange buffer; its last program to finish pushes the slot to every
peer over NVLink and raises a flag there (runtime/tp_signal.py). A one-warp kernel waits for the peers'
flags; the consumer, the next RMSNorm-GEMV (gate/up, the next layer's qkv, lm_head), sums the slots in rank
order and writes the summed residual stream for the next residual GEMV. lm_head's vocab slices reach every
rank's logits row the same way. No collective kernel and no host sync is left in the step, and with
programmatic dependent launch the consumer's first weight tiles load while the peers are still producing.

Buffers live in PyTorch symmetric memory (peer-mapped allocations, NVLink multicast off, as in
runtime/fast_allreduce.py): one slot row per rank for each of the step's 2 x layers points, the logits
row, and int64 flags and counters. Every point is produced and consumed exactly once per step, in the same order on
every rank (TP ranks run the same steps), so `begin_step` only adds 1 to the on-device epoch.

Set-up is collective and checks the fused kernels against dist.all_reduce / all_gather on random data;
the ranks agree, and on any failure `enabled` is False with the reason (the step keeps its collectives).

OFF unless ENGINESMITH_TP_EXCHANGE=1: on 2 x H200 every version so far made the tp=2 batch-1 step slower
than the one-shot symmetric-memory all-reduce (runtime/fast_allreduce.py) with PDL: the last one by 5% on
Llama-3-8B and 9% on Llama-3-70B-shaped layers (benchmarks/results/runtime-h200-x2-tp*-exchange-v4.json;
v1-v3 in runtime/tp_signal.py). It stays, correct and tested, as the base for the next attempt.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime import tp_signal
from runtime.fast_allreduce import all_ranks_ok

log = logging.getLogger(__name__)
ENV_SWITCH = "ENGINESMITH_TP_EXCHANGE"
_ALIGN = 256


@dataclass(frozen=True)
class Link:
    epoch: torch.Tensor
    """(1,) int64 on the device: decode steps begun."""
    err: torch.Tensor
    """(1,) int32: set by a wait that gave up (a peer never arrived)."""
    rank: int
    tp: int


@dataclass(frozen=True)
class Recv:
    """Where a consumer kernel finds its input: slot q of `slots` is rank q's partial."""
    slots: torch.Tensor  # (tp, n), this rank's buffer
    link: Link


@dataclass(frozen=True)
class Send:
    """Where a producer kernel stores its output: this rank's slice on every rank."""
    dst: torch.Tensor  # (tp,) int64 addresses of this rank's slice in each rank's buffer
    flags: torch.Tensor  # (tp,) int64 addresses of this rank's flag in each rank's buffer
    count: torch.Tensor  # (1,) int64 in this rank's buffer: the producer's programs so far
    slice_like: torch.Tensor  # the slice in this rank's own buffer (its shape and dtype)
    link: Link


class TPExchange:
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
        return dict(enabled=self.enabled, reason=self.reason, self_check_rel_err=self.check_err, pdl=self.pdl,
                    points=self.num_points)

    # ---- the step's view ----
    def begin_step(self) -> None:
        self.link.epoch.add_(1)

    def recv(self, point: int) -> Recv:
        """Waits (a one-warp kernel) for the peers' slots of `point`; the returned Recv feeds the consumer."""
        self._wait(point)
        return Recv(self._slots[point], self.link)

    def send(self, point: int) -> Send:
        return Send(self._dst[point], self._dflag[point], self._flags[point, self.tp:],
                    self._slots[point, self.rank].view(1, -1), self.link)

    def send_logits(self) -> Send:
        v, p = self.vocab_local, self.num_points
        return Send(self._dst_logits, self._dflag[p], self._flags[p, self.tp:],
                    self._logits[:, self.rank * v: (self.rank + 1) * v], self.link)

    def wait_logits(self) -> torch.Tensor:
        """(1, tp x vocab_local) float32: every rank's lm_head slice, once the peers' have arrived."""
        self._wait(self.num_points)
        return self._logits

    def _wait(self, point: int) -> None:
        """The stream goes on once every peer has raised its flag of `point` (the logits: num_points) to the epoch."""
        tp_signal.wait(self._flags[point, : self.tp], self.link.epoch, self.rank, self.link.err, self.tp, self.pdl,
                       self.spin)

    def check_error(self) -> None:
        """Raise if a wait gave up (a host sync: call it between steps, not inside a graph)."""
        if int(self.link.err.item()):
            raise RuntimeError("TP exchange: a peer rank never delivered its partial (dead or out of step); "
                               "the last step's output is invalid")

    def reset(self) -> None:
        """Collective: zero the counters and the epoch on every rank (nothing may be in flight)."""
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._flags.zero_()
        self.link.epoch.zero_()
        self.link.err.zero_()
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)

    # ---- set-up ----
    def _local_problem(self) -> str | None:
        if os.environ.get(ENV_SWITCH, "0") != "1":
            return f"off (measured slower than the one-shot all-reduce; {ENV_SWITCH}=1 turns it on)"
        if self.device.type != "cuda":
            return f"device is {self.device.type}: the TP exchange needs CUDA peer memory"
        if self.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return f"dtype {self.dtype}"
        return None

    @staticmethod
    def layout(tp: int, num_points: int, hidden: int, vocab_local: int, dtype: torch.dtype) -> tuple[list[int], int]:
        """Byte offsets of the slots, the logits row and the flags in one rank's buffer, and its size. Flags:
        per point, one per source rank (the epoch its producer last completed) and this rank's program counter."""
        offs, total = [], 0
        for size in (num_points * tp * hidden * dtype.itemsize, tp * vocab_local * 4, (num_points + 1) * (tp + 1) * 8):
            offs.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        return offs, total

    @classmethod
    def over_buffers(cls, bufs: list[torch.Tensor], rank: int, dtype: torch.dtype, hidden: int, vocab_local: int,
                     num_points: int, *, pdl: bool = False, spin: int = tp_signal.SPIN_LIMIT) -> TPExchange:
        """Rank `rank`'s exchange over every rank's zeroed byte buffer (`layout` sized) in one address space:
        no collective and no self-check (tests run the ranks as threads under Triton's interpreter)."""
        ex = cls.__new__(cls)
        ex._set(None, rank, len(bufs), bufs[rank].device, dtype, hidden, vocab_local, num_points, pdl, spin)
        ex._attach(bufs[rank], [b.data_ptr() for b in bufs])
        return ex

    def _set(self, group, rank: int, tp: int, device, dtype: torch.dtype, hidden: int, vocab_local: int,
             num_points: int, pdl: bool, spin: int) -> None:
        self.group, self.rank, self.tp, self.device, self.dtype = group, rank, tp, torch.device(device), dtype
        self.hidden, self.vocab_local, self.num_points, self.pdl, self.spin = hidden, vocab_local, num_points, pdl, spin
        self.reason, self.check_err, self._buf = "", None, None

    def _allocate(self) -> None:
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # before any symmetric allocation: no cuMulticast*
        import torch.distributed._symmetric_memory as symm_mem

        _, total = self.layout(self.tp, self.num_points, self.hidden, self.vocab_local, self.dtype)
        buf = symm_mem.empty(total, dtype=torch.uint8, device=self.device)
        buf.zero_()
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
        (s_off, l_off, f_off), total = self.layout(tp, p, h, v, self.dtype)
        if buf.numel() < total or buf.dtype != torch.uint8:
            raise ValueError(f"exchange buffer of {buf.numel()} {buf.dtype} elements, need {total} uint8")
        self._slots = buf[s_off: s_off + p * tp * h * es].view(self.dtype).view(p, tp, h)
        self._logits = buf[l_off: l_off + tp * v * 4].view(torch.float32).view(1, tp * v)
        self._flags = buf[f_off: f_off + (p + 1) * (tp + 1) * 8].view(torch.int64).view(p + 1, tp + 1)
        r, dev = self.rank, self.device

        def table(rows) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.int64, device=dev)

        self._dst = table([[ptrs[q] + s_off + (i * tp + r) * h * es for q in range(tp)] for i in range(p)])
        self._dflag = table([[ptrs[q] + f_off + (i * (tp + 1) + r) * 8 for q in range(tp)] for i in range(p + 1)])
        self._dst_logits = table([ptrs[q] + l_off + r * v * 4 for q in range(tp)])
        self.link = Link(torch.zeros(1, dtype=torch.int64, device=dev), torch.zeros(1, dtype=torch.int32, device=dev),
                         r, tp)
        self._buf = buf

    def _self_check(self) -> None:
        """One exchange step on random weights: a residual GEMV into point 0, an RMSNorm GEMV out of it into
        the logits, against the same arithmetic with dist.all_reduce / all_gather; then the counters reset."""
        from runtime import triton_gemv
        from runtime.gemv_ref import gemv_ref, rel_err

        h, v, dev, dt = self.hidden, self.vocab_local, self.device, self.dtype
        gen = torch.Generator(device="cpu").manual_seed(7 + self.rank)

        def rnd(*shape) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dev, dt)

        k_part, n_out = 256, min(v, 2048)  # the logits check fills the first n_out columns of each slice
        x, res, w1, w2, norm = rnd(1, k_part), rnd(1, h), rnd(h, k_part), rnd(n_out, h), 1 + rnd(h)
        with torch.inference_mode():
            part = gemv_ref(x, w1, residual=res if self.rank == 0 else None)
            summed = part.clone()
            dist.all_reduce(summed, group=self.group)
            ref_h = summed
            ref_slice = gemv_ref(ref_h, w2, norm=norm, out_f32=True)
            parts = [torch.empty_like(ref_slice) for _ in range(self.tp)]
            dist.all_gather(parts, ref_slice, group=self.group)
            ref_logits = torch.cat(parts, -1).view(self.tp, n_out)
            self.begin_step()
            triton_gemv.gemv(x, w1, residual=res if self.rank == 0 else None, pdl=self.pdl, send=self.send(0))
            got_h = torch.empty(1, h, dtype=dt, device=dev)
            triton_gemv.gemv(got_h, w2, norm=norm, out_f32=True, pdl=self.pdl, recv=self.recv(0),
                             send=self.send_logits())
            logits = self.wait_logits().view(self.tp, v)[:, :n_out].clone()
            torch.cuda.synchronize(dev)
        self.check_error()
        self.check_err = max(rel_err(got_h, ref_h), rel_err(logits, ref_logits))
        self.reset()
        if not self.check_err < (1e-4 if dt == torch.float32 else 2e-2):
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
    from runtime import pdl

    return TPExchange(groups.tp_group, groups.coords.tp_rank, groups.mapping.tp_size, device, model.dtype,
                      model.cfg.hidden_size, model.lm_head.shape[0], 2 * model.num_local_layers,
                      pdl=pdl.enabled(device))
