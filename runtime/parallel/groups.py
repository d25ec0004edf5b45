"""Process groups for one rank of a Mapping, and the collectives the rank model needs.

Data moves over the default backend (NCCL on GPUs, gloo on CPU); step descriptions from the
driver (rank 0) move over a separate gloo group so they never touch the GPU stream.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from enginesmith.builders.mapping import Mapping, RankCoords


@dataclass
class ParallelGroups:
    mapping: Mapping
    coords: RankCoords
    tp_group: object | None
    control: object
    """gloo group over all ranks, for pickled step descriptions."""
    fast_ar: object | None = None
    """enginesmith.runtime.parallel.fast_allreduce.FastAllReduce for small CUDA tensors (see enable_fast_all_reduce);
    None: NCCL/gloo."""

    @property
    def rank(self) -> int:
        return self.coords.rank

    @property
    def tp_ranks(self) -> list[int]:
        return self.mapping.tp_group(self.coords.pp_rank)

    @property
    def prev_stage_rank(self) -> int | None:
        p = self.coords.pp_rank
        return None if p == 0 else (p - 1) * self.mapping.tp_size + self.coords.tp_rank

    @property
    def next_stage_rank(self) -> int | None:
        p = self.coords.pp_rank
        return None if p == self.mapping.pp_size - 1 else (p + 1) * self.mapping.tp_size + self.coords.tp_rank

    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the TP group; use the returned tensor (the fast path returns a new one)."""
        if self.mapping.tp_size > 1:
            if self.fast_ar is not None and self.fast_ar.accepts(x):  # issue 6: one-shot P2P all-reduce
                return self.fast_ar(x)
            dist.all_reduce(x, group=self.tp_group)
        return x

    def enable_fast_all_reduce(self, max_bytes: int, dtype: torch.dtype, device: torch.device) -> dict:
        """Collective over the TP group: route TP all-reduces of CUDA tensors up to `max_bytes` through the
        symmetric-memory one-shot kernel (runtime/parallel/fast_allreduce.py) if it passes its self-check; returns its
        status (why not, when it stays off). CPU and tp_size 1 keep the plain path without any collective."""
        if self.mapping.tp_size == 1 or torch.device(device).type != "cuda":
            return dict(enabled=False, reason=f"tp_size {self.mapping.tp_size} on {torch.device(device).type}: "
                                              "plain all-reduce")
        from enginesmith.runtime.parallel.fast_allreduce import FastAllReduce

        ar = FastAllReduce(self.tp_group, device, dtype, max_bytes)
        self.fast_ar = ar if ar.enabled else None
        return ar.status()

    def gather_tp_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each TP rank's slice along the last dim (vocab-parallel logits)."""
        if self.mapping.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.mapping.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)


def init_parallel(mapping: Mapping, rank: int, init_method: str, backend: str,
                  timeout_s: float = 30.0, control_timeout_s: float | None = None) -> ParallelGroups:
    """Join the job; every rank creates every TP group in the same order, as torch.distributed requires.
    `timeout_s` bounds each collective of a step; `control_timeout_s` (default: the same) how long a rank
    waits on the control group for rank 0's next message (runtime/parallel/liveness.py keeps that wait short)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=mapping.world_size,
                            timeout=timeout)
    tp_group = None
    for pp_rank in range(mapping.pp_size):
        g = dist.new_group(mapping.tp_group(pp_rank), backend=backend, timeout=timeout)
        if rank in mapping.tp_group(pp_rank):
            tp_group = g
    control = dist.new_group(list(range(mapping.world_size)), backend="gloo",
                             timeout=datetime.timedelta(seconds=control_timeout_s or timeout_s))
    return ParallelGroups(mapping, mapping.rank_coords(rank), tp_group, control)
