"""Communication per engine step, as each build target runs it: TP all-reduces, PP sends, the lm_head gather.

The alpha-beta model of builders.planner.hardware.Link prices each operation on the slowest link of its group.
Every target all-reduces twice per decoder layer over the TP group, messages of tokens * H * act_bytes:
after attention, and after the MLP or the MoE block. The MoE block is one all-reduce over the whole TP group
whatever the EP/TP split (each rank runs its experts, or its slice of each expert, on every token and the
partial sums are reduced together): no all-to-all, so the split changes no communication. The last stage
all-gathers the vocab-parallel float32 logits over its TP group, and consecutive PP stages send the hidden
states. The reference runtime (runtime/parallel/pipeline.py) does exactly that and, with PP, also sends the last
stage's full float32 logits to rank 0, which samples; TensorRT-LLM samples on the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from enginesmith.builders.planner.hardware import HardwareSpec
from enginesmith.builders.mapping import Mapping, pad_vocab_size
from enginesmith.builders.model_spec import ModelSpec

_EVERY_TARGET = ("per layer two all-reduces over the TP group (after attention; after the MLP or MoE block: one "
                 "whatever the EP/TP split), the lm_head all-gather, PP sends of the hidden states")
TARGET_COMMS = {
    "trtllm-engine": f"TensorRT-LLM engine: {_EVERY_TARGET}",
    "trtllm-llmapi": f"TensorRT-LLM LLM API: {_EVERY_TARGET}",
    "reference": f"reference runtime: {_EVERY_TARGET}, and with PP the last stage's float32 logits to rank 0",
}
"""What each build target's communication figures are, for the rendered plan."""


@dataclass(frozen=True, slots=True)
class CommFigure:
    """One kind of collective over a whole step (all stages traversed once)."""

    kind: str
    """tp_allreduce | lm_head_allgather | pp_p2p | logits_to_rank0 (reference target with PP)"""
    link: str
    """Slowest link the group uses: nvlink | pcie | infiniband | ethernet."""
    group_size: int
    count: int
    """Operations per step."""
    bytes_per_op: float
    """Message (all-reduce, p2p) or per-GPU send volume (gather) of one operation."""
    bytes_per_gpu: float
    """Bytes each GPU puts on the link per step."""
    time_s: float
    """Serialized time per step."""


_SLOWNESS = ["nvlink", "pcie", "infiniband", "ethernet"]


def stage_comm(spec: ModelSpec, m: Mapping, hw: HardwareSpec, pp_rank: int, layers: list[int], tokens: int,
               seqs: int, act_bytes: int) -> list[CommFigure]:
    """Collectives one PP stage runs for a step of `tokens` new tokens from `seqs` sequences (every target)."""
    out: list[CommFigure] = []
    msg = tokens * spec.hidden_size * act_bytes
    tp = m.tp_size
    if tp > 1:
        link = hw.link_for(m.tp_group(pp_rank))
        count = 2 * len(layers)
        moved = 2 * (tp - 1) / tp * msg
        out.append(CommFigure("tp_allreduce", link.kind, tp, count, msg, moved * count,
                              count * link.ring_allreduce_s(msg, tp)))
    if pp_rank == m.pp_size - 1 and tp > 1:
        link = hw.link_for(m.tp_group(pp_rank))
        send = seqs * pad_vocab_size(spec.vocab_size, tp) * 4 * (tp - 1) / tp
        out.append(CommFigure("lm_head_allgather", link.kind, tp, 1, send, send,
                              link.transfer_s(send, steps=tp - 1)))
    return out


def p2p_comm(spec: ModelSpec, m: Mapping, hw: HardwareSpec, tokens: int, seqs: int, act_bytes: int,
             target: str) -> list[CommFigure]:
    """Point-to-point sends of one micro-batch: hidden states between consecutive PP stages (p-1 hops), and
    for the reference target the last stage's float32 logits of its `seqs` sequences to rank 0."""
    if m.pp_size == 1:
        return []
    msg = tokens * spec.hidden_size * act_bytes
    links = [hw.link_for([s * m.tp_size, (s + 1) * m.tp_size]) for s in range(m.pp_size - 1)]
    slowest = min(links, key=lambda link: link.gbps)
    out = [CommFigure("pp_p2p", slowest.kind, 2, m.pp_size - 1, msg, msg,
                      sum(link.transfer_s(msg) for link in links))]
    if target == "reference":
        link = hw.link_for([0, (m.pp_size - 1) * m.tp_size])
        logits = seqs * spec.vocab_size * 4
        out.append(CommFigure("logits_to_rank0", link.kind, 2, 1, logits, logits, link.transfer_s(logits)))
    return out


def merge(figures: list[CommFigure]) -> list[CommFigure]:
    """Sum figures of the same kind across stages."""
    by: dict[str, CommFigure] = {}
    for f in figures:
        if f.kind in by:
            g = by[f.kind]
            slower = max(g.link, f.link, key=_SLOWNESS.index)
            by[f.kind] = CommFigure(f.kind, slower, f.group_size, g.count + f.count, g.bytes_per_op,
                                    g.bytes_per_gpu + f.bytes_per_gpu, g.time_s + f.time_s)
        else:
            by[f.kind] = f
    return list(by.values())
