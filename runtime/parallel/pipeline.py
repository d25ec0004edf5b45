"""One rank's forward pass over a step split into micro-batches (GPipe-style, forward only).

Stage s runs micro-batch j while stage s+1 runs micro-batch j-1: sends are asynchronous, so the
pipeline bubble is (p-1)/(m+p-1) of a step for p stages and m micro-batches. TP partial outputs are
all-reduced right where TensorRT-LLM does (after attention, after the MLP/MoE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from enginesmith.runtime.model.model import RankModel
from enginesmith.runtime.parallel.groups import ParallelGroups


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    logit_rows: torch.Tensor  # (n,) rows of T whose next-token logits are wanted
    attn: Callable  # AttentionBackend for this rank and micro-batch


def run_layers(model: RankModel, reduce: Callable | None, hidden: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """All local layers of this rank; `reduce` is the TP all-reduce (None: a single rank, no communication)."""
    rope = model.rope(mb.positions)
    reduce = reduce or (lambda x: x)
    for i in range(model.num_local_layers):
        hidden = hidden + reduce(model.attention_partial(i, hidden, mb.positions, mb.attn, rope))
        hidden = hidden + reduce(model.mlp_partial(i, hidden))
    return hidden


@torch.no_grad()
def rank_forward(model: RankModel, groups: ParallelGroups, micro_batches: list[MicroBatch],
                 layers: Callable = run_layers) -> list[torch.Tensor]:
    """Run this rank's share of every micro-batch through `layers` (run_layers, or a runner with its
    arithmetic: runtime/fast/prefill_layers.py); returns full-vocab logits (n, V) on global rank 0."""
    sends, logits = [], []
    reduce = groups.all_reduce_tp if groups.mapping.tp_size > 1 else None
    for mb in micro_batches:
        if model.is_first_stage:
            hidden = model.embed(mb.input_ids)
        else:
            hidden = torch.empty(mb.input_ids.numel(), model.cfg.hidden_size, dtype=model.dtype, device=model.device)
            dist.recv(hidden, src=groups.prev_stage_rank)
        hidden = layers(model, reduce, hidden, mb)
        if not model.is_last_stage:
            sends.append((dist.isend(hidden, dst=groups.next_stage_rank), hidden))
            continue
        full = groups.gather_tp_last_dim(model.final_logits_shard(hidden[mb.logit_rows]))
        full = full[:, : model.cfg.vocab_size].contiguous()
        if groups.rank == 0:
            logits.append(full)
        elif groups.coords.tp_rank == 0:
            sends.append((dist.isend(full, dst=0), full))
    if groups.rank == 0 and not model.is_last_stage:
        last_stage_lead = (groups.mapping.pp_size - 1) * groups.mapping.tp_size
        for mb in micro_batches:
            out = torch.empty(mb.logit_rows.numel(), model.cfg.vocab_size, dtype=torch.float32, device=model.device)
            dist.recv(out, src=last_stage_lead)
            logits.append(out)
    for work, _tensor in sends:  # the tensor stays referenced until its send completes
        work.wait()
    return logits
