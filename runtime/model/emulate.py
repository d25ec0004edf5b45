"""Run every rank of a converted checkpoint in one process: the correctness oracle for conversion.

TP partial outputs are summed exactly where TensorRT-LLM all-reduces (after attention and after the
MLP/MoE), PP stages run one after another, and the vocab-parallel logits are gathered and unpadded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from enginesmith.runtime.model.attention import DenseCausalAttention
from enginesmith.runtime.model.checkpoint import CheckpointConfig
from enginesmith.runtime.model.model import RankModel


def load_all_ranks(ckpt_dir: str | Path, dtype: torch.dtype | str | None = torch.float32) -> list[RankModel]:
    cfg = CheckpointConfig.from_dir(ckpt_dir)
    return [RankModel.load(ckpt_dir, r, dtype=dtype) for r in range(cfg.mapping.world_size)]


@torch.no_grad()
def emulate_logits(ckpt_dir: str | Path | list[RankModel], input_ids: torch.Tensor | list[list[int]],
                   dtype: torch.dtype | str | None = torch.float32) -> torch.Tensor:
    """Logits (T, V) for packed prompts; `input_ids` is one sequence (1-D) or a list of sequences."""
    models = ckpt_dir if isinstance(ckpt_dir, list) else load_all_ranks(ckpt_dir, dtype)
    seqs = [list(map(int, input_ids))] if isinstance(input_ids, torch.Tensor) else [list(s) for s in input_ids]
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    attn = DenseCausalAttention([len(s) for s in seqs])
    mapping = models[0].cfg.mapping
    hidden = None
    for pp_rank in range(mapping.pp_size):
        group = [models[r] for r in mapping.tp_group(pp_rank)]
        if pp_rank == 0:
            hidden = group[0].embed(ids)
        rope = group[0].rope(positions)
        for i in range(group[0].num_local_layers):
            hidden = hidden + sum(m.attention_partial(i, hidden, positions, attn, rope) for m in group)
            hidden = hidden + sum(m.mlp_partial(i, hidden) for m in group)
    last = [models[r] for r in mapping.tp_group(mapping.pp_size - 1)]
    logits = torch.cat([m.final_logits_shard(hidden) for m in last], dim=-1)
    return logits[:, : models[0].cfg.vocab_size]
