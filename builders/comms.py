"""Communication per engine step: TP all-reduce, EP all-to-all, PP send/recv and the lm_head gather.

The alpha-beta model of builders.hardware.Link prices each operation on the slowest link of its group.
Per decoder layer TensorRT-LLM all-reduces twice over the TP group (after attention, after the MLP),
messages of tokens * H * act_bytes. With expert parallelism (moe_ep_size > 1) the MoE block's reduction
is modelled as an all-to-all instead: each GPU dispatches its 1/ep share of the tokens' top-k copies to
the experts' owners and gets them back ((ep-1)/ep of them leave the GPU), plus an all-reduce over the
moe_tp group when experts are also split by width. The last stage all-gathers float32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from builders.hardware import HardwareSpec
from builders.mapping import Mapping, pad_vocab_size
from builders.model_spec import ModelSpec


@dataclass(frozen=True, slots=True)
class CommFigure:
    """One kind of collective over a whole step (all stages traversed once)."""

    kind: str
    """tp_allreduce | ep_alltoall | moe_tp_allreduce | lm_head_allgather | pp_p2p"""
    link: str
    """Slowest link the group uses: nvlink | pcie | infiniband | ethernet."""
    group_size: int
    count: int
    """Operations per step."""
    bytes_per_op: float
    """Message (all-reduce, p2p) or per-GPU send volume (all-to-all, gather) of one operation."""
    bytes_per_gpu: float
    """Bytes each GPU puts on the link per step."""
    time_s: float
    """Serialized time per step."""


_SLOWNESS = ["nvlink", "pcie", "infiniband", "ethernet"]


def _ep_group(m: Mapping, pp_rank: int, moe_tp_rank: int) -> list[int]:
    return [pp_rank * m.tp_size + moe_tp_rank * m.moe_ep_size + e for e in range(m.moe_ep_size)]


def _moe_tp_group(m: Mapping, pp_rank: int) -> list[int]:
    return [pp_rank * m.tp_size + t * m.moe_ep_size for t in range(m.moe_tp_size)]


def stage_comm(spec: ModelSpec, m: Mapping, hw: HardwareSpec, pp_rank: int, layers: list[int], tokens: int,
               seqs: int, act_bytes: int) -> list[CommFigure]:
    """Collectives one PP stage runs for a step of `tokens` new tokens from `seqs` sequences."""
    out: list[CommFigure] = []
    msg = tokens * spec.hidden_size * act_bytes
    n_moe = sum(1 for i in layers if spec.is_moe_layer(i))
    tp, ep = m.tp_size, m.moe_ep_size
    if tp > 1:
        link = hw.link_for(m.tp_group(pp_rank))
        count = len(layers) + (len(layers) - n_moe) + (n_moe if ep == 1 else 0)
        moved = 2 * (tp - 1) / tp * msg
        out.append(CommFigure("tp_allreduce", link.kind, tp, count, msg, moved * count,
                              count * link.ring_allreduce_s(msg, tp)))
    if ep > 1 and n_moe:
        link = hw.link_for(_ep_group(m, pp_rank, 0))
        send = -(-tokens // ep) * spec.num_experts_per_tok * spec.hidden_size * act_bytes * (ep - 1) / ep
        per_layer = 2 * link.transfer_s(send, steps=ep - 1)  # dispatch + combine
        out.append(CommFigure("ep_alltoall", link.kind, ep, 2 * n_moe, send, 2 * send * n_moe, per_layer * n_moe))
        if m.moe_tp_size > 1:
            link = hw.link_for(_moe_tp_group(m, pp_rank))
            mt = m.moe_tp_size
            out.append(CommFigure("moe_tp_allreduce", link.kind, mt, n_moe, msg, 2 * (mt - 1) / mt * msg * n_moe,
                                  n_moe * link.ring_allreduce_s(msg, mt)))
    if pp_rank == m.pp_size - 1 and tp > 1:
        link = hw.link_for(m.tp_group(pp_rank))
        send = seqs * pad_vocab_size(spec.vocab_size, tp) * 4 * (tp - 1) / tp
        out.append(CommFigure("lm_head_allgather", link.kind, tp, 1, send, send,
                              link.transfer_s(send, steps=tp - 1)))
    return out


def p2p_comm(spec: ModelSpec, m: Mapping, hw: HardwareSpec, tokens: int, act_bytes: int) -> CommFigure | None:
    """Hidden states sent between consecutive PP stages (p-1 hops per step)."""
    if m.pp_size == 1:
        return None
    msg = tokens * spec.hidden_size * act_bytes
    links = [hw.link_for([s * m.tp_size, (s + 1) * m.tp_size]) for s in range(m.pp_size - 1)]
    slowest = min(links, key=lambda link: link.gbps)
    return CommFigure("pp_p2p", slowest.kind, 2, m.pp_size - 1, msg, msg,
                      sum(link.transfer_s(msg) for link in links))


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
