"""TensorRT-LLM's rank layout (`tensorrt_llm/mapping.py`), as small pure functions.

Rank order follows TensorRT-LLM: TP innermost, PP outermost (cp_size is always 1 here):
    tp_rank = rank % tp_size,  pp_rank = rank // tp_size,  rank = pp_rank * tp_size + tp_rank.
EP is carved out of the TP group: tp_size == moe_tp_size * moe_ep_size, with
    moe_ep_rank = tp_rank % moe_ep_size,  moe_tp_rank = tp_rank // moe_ep_size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class MappingError(ValueError):
    """A parallel layout that TensorRT-LLM would reject."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """A resolved parallel layout, named exactly as TensorRT-LLM's `Mapping`."""

    world_size: int
    tp_size: int = 1
    pp_size: int = 1
    moe_tp_size: int = 1
    moe_ep_size: int = 1
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        for name in ("world_size", "tp_size", "pp_size", "moe_tp_size", "moe_ep_size", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise MappingError(f"{name}={getattr(self, name)} must be >= 1")
        if self.tp_size * self.pp_size != self.world_size:
            raise MappingError(
                f"world_size={self.world_size} must equal tp_size*pp_size={self.tp_size * self.pp_size}"
            )
        if self.moe_tp_size * self.moe_ep_size != self.tp_size:
            raise MappingError(
                f"moe_tp_size*moe_ep_size={self.moe_tp_size * self.moe_ep_size} must equal "
                f"tp_size={self.tp_size}"
            )

    @classmethod
    def create(cls, tp_size: int = 1, pp_size: int = 1, moe_ep_size: int | None = None,
               moe_tp_size: int | None = None, gpus_per_node: int = 8) -> Mapping:
        """Build a mapping, deriving the MoE split as TensorRT-LLM does when one side is unset."""
        for name, value in (("tp_size", tp_size), ("moe_ep_size", moe_ep_size), ("moe_tp_size", moe_tp_size)):
            if value is not None and value < 1:
                raise MappingError(f"{name}={value} must be >= 1")
        if moe_ep_size is None and moe_tp_size is None:
            moe_tp_size, moe_ep_size = tp_size, 1
        elif moe_tp_size is None:
            if tp_size % moe_ep_size:
                raise MappingError(f"moe_ep_size={moe_ep_size} must divide tp_size={tp_size}")
            moe_tp_size = tp_size // moe_ep_size
        elif moe_ep_size is None:
            if tp_size % moe_tp_size:
                raise MappingError(f"moe_tp_size={moe_tp_size} must divide tp_size={tp_size}")
            moe_ep_size = tp_size // moe_tp_size
        return cls(world_size=tp_size * pp_size, tp_size=tp_size, pp_size=pp_size,
                   moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size, gpus_per_node=gpus_per_node)

    def rank_coords(self, rank: int) -> RankCoords:
        """Coordinates of one global rank."""
        if not 0 <= rank < self.world_size:
            raise MappingError(f"rank={rank} outside 0..{self.world_size - 1}")
        tp_rank = rank % self.tp_size
        return RankCoords(
            rank=rank,
            tp_rank=tp_rank,
            pp_rank=rank // self.tp_size,
            moe_ep_rank=tp_rank % self.moe_ep_size,
            moe_tp_rank=tp_rank // self.moe_ep_size,
            node=rank // self.gpus_per_node,
            local_gpu=rank % self.gpus_per_node,
        )

    def ranks(self) -> list[RankCoords]:
        return [self.rank_coords(r) for r in range(self.world_size)]

    def tp_group(self, pp_rank: int) -> list[int]:
        """Global ranks of PP stage `pp_rank` (one TP group)."""
        if not 0 <= pp_rank < self.pp_size:
            raise MappingError(f"pp_rank={pp_rank} outside 0..{self.pp_size - 1}")
        return [pp_rank * self.tp_size + t for t in range(self.tp_size)]

    def pp_group(self, tp_rank: int) -> list[int]:
        """Global ranks sharing `tp_rank` across the stages (one PP group)."""
        if not 0 <= tp_rank < self.tp_size:
            raise MappingError(f"tp_rank={tp_rank} outside 0..{self.tp_size - 1}")
        return [p * self.tp_size + tp_rank for p in range(self.pp_size)]

    def to_trtllm_dict(self) -> dict:
        """The portable subset of `Mapping.to_dict()` that every 1.x version accepts."""
        d = asdict(self)
        d.update(cp_size=1, moe_cluster_size=1)
        return {k: d[k] for k in ("world_size", "gpus_per_node", "cp_size", "tp_size", "pp_size",
                                   "moe_tp_size", "moe_ep_size", "moe_cluster_size")}


@dataclass(frozen=True, slots=True)
class RankCoords:
    rank: int
    tp_rank: int
    pp_rank: int
    moe_ep_rank: int
    moe_tp_rank: int
    node: int
    local_gpu: int


def pp_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global layer indices of one PP stage: `torch.tensor_split` order, first stages get the extra layers."""
    if pp_size < 1 or num_layers < pp_size:
        raise MappingError(f"pp_size={pp_size} must be in 1..num_hidden_layers={num_layers}")
    if not 0 <= pp_rank < pp_size:
        raise MappingError(f"pp_rank={pp_rank} outside 0..{pp_size - 1}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def ep_experts(num_experts: int, moe_ep_size: int, moe_ep_rank: int) -> range:
    """Contiguous block of experts owned by one EP rank."""
    if moe_ep_size < 1 or num_experts % moe_ep_size:
        raise MappingError(f"moe_ep_size={moe_ep_size} must divide num_experts={num_experts}")
    if not 0 <= moe_ep_rank < moe_ep_size:
        raise MappingError(f"moe_ep_rank={moe_ep_rank} outside 0..{moe_ep_size - 1}")
    n = num_experts // moe_ep_size
    return range(moe_ep_rank * n, (moe_ep_rank + 1) * n)


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    """lm_head rows after TensorRT-LLM's padding: ceil(V / tp) * tp."""
    return -(-vocab_size // tp_size) * tp_size


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each TP rank holds: ceil(nkv / tp); below nkv < tp heads are duplicated."""
    return -(-num_kv_heads // tp_size)


def kv_head_of_rank(num_kv_heads: int, tp_size: int, tp_rank: int) -> int:
    """The KV head a rank holds when heads are duplicated (nkv < tp): tp_rank * nkv // tp."""
    return tp_rank * num_kv_heads // tp_size
