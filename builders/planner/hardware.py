"""GPU catalogue and interconnects: the numbers the planner's memory and roofline maths use.

Figures are NVIDIA datasheet values for dense (non-sparse) tensor-core throughput. `memory_gib` is the
total nvidia-smi reports (MiB / 1024), since that is what a runtime can allocate from. `float32` uses
TF32 tensor cores (TensorRT enables TF32 by default). Link bandwidths are per GPU, per direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from enginesmith.builders.planner.perf_constants import COLLECTIVE_LATENCY_US, HOP_LATENCY_US

if TYPE_CHECKING:
    from enginesmith.builders.recipe import HardwareSection

GIB = 1 << 30
ComputeDtype = Literal["float32", "float16", "bfloat16", "fp8", "int8"]
LinkKind = Literal["nvlink", "pcie", "infiniband", "ethernet"]



@dataclass(frozen=True, slots=True)
class GpuKind:
    """One catalogue entry."""

    name: str
    memory_gib: float
    hbm_gbps: float
    tflops: dict[str, float]
    """Dense tensor-core TFLOP/s (TOP/s for int8) per compute dtype."""
    sm: int
    """Compute capability x10 (80 = Ampere A100, 86 = A10, 89 = Ada, 90 = Hopper)."""
    intra_node: LinkKind
    intra_node_gbps: float
    inter_node_gbps: float
    """Typical NIC per GPU in clusters of this GPU (HDR 200 Gb/s = 25 GB/s, NDR 400 Gb/s = 50 GB/s)."""

    @property
    def fp8(self) -> bool:
        return self.sm >= 89


def _ampere(bf16: float, int8: float, tf32: float) -> dict[str, float]:
    return {"float32": tf32, "float16": bf16, "bfloat16": bf16, "int8": int8}


def _with_fp8(bf16: float, fp8: float, int8: float, tf32: float) -> dict[str, float]:
    return {**_ampere(bf16, int8, tf32), "fp8": fp8}


CATALOGUE: dict[str, GpuKind] = {g.name: g for g in (
    GpuKind("A100-40", 40.0, 1555.0, _ampere(312.0, 624.0, 156.0), 80, "nvlink", 300.0, 25.0),
    GpuKind("A100-80", 80.0, 2039.0, _ampere(312.0, 624.0, 156.0), 80, "nvlink", 300.0, 25.0),
    GpuKind("H100", 79.6, 3350.0, _with_fp8(989.4, 1978.9, 1978.9, 494.7), 90, "nvlink", 450.0, 50.0),
    GpuKind("H200", 140.4, 4800.0, _with_fp8(989.4, 1978.9, 1978.9, 494.7), 90, "nvlink", 450.0, 50.0),
    GpuKind("L4", 22.5, 300.0, _with_fp8(121.0, 242.0, 242.0, 60.0), 89, "pcie", 25.0, 12.5),
    GpuKind("L40S", 45.0, 864.0, _with_fp8(362.0, 733.0, 733.0, 183.0), 89, "pcie", 25.0, 12.5),
    GpuKind("RTX4090", 24.0, 1008.0, _with_fp8(165.2, 330.3, 660.6, 82.6), 89, "pcie", 25.0, 12.5),
    GpuKind("A10-24GB", 22.5, 600.0, _ampere(125.0, 250.0, 62.5), 86, "pcie", 25.0, 12.5),
)}
GPU_KINDS: tuple[str, ...] = (*CATALOGUE, "custom")


@dataclass(frozen=True, slots=True)
class Link:
    """One interconnect as the alpha-beta model sees it."""

    kind: str
    gbps: float
    """GB/s per GPU per direction."""
    latency_us: float
    """Latency of one ring step (builders.planner.perf_constants.HOP_LATENCY_US)."""
    op_latency_us: float = 0.0
    """Fixed latency of one operation, paid once however small the message (COLLECTIVE_LATENCY_US)."""

    def ring_allreduce_s(self, message_bytes: float, ranks: int) -> float:
        """Ring all-reduce: one operation of 2(p-1) steps, each GPU moves 2(p-1)/p of the message."""
        if ranks <= 1:
            return 0.0
        moved = 2 * (ranks - 1) / ranks * message_bytes
        return (self.op_latency_us + 2 * (ranks - 1) * self.latency_us) * 1e-6 + moved / (self.gbps * 1e9)

    def transfer_s(self, nbytes: float, steps: int = 1) -> float:
        """One point-to-point (or all-to-all with `steps` peers) operation of `nbytes` per GPU."""
        if nbytes <= 0:
            return 0.0
        return (self.op_latency_us + steps * self.latency_us) * 1e-6 + nbytes / (self.gbps * 1e9)


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    """The recipe's hardware section, resolved against the catalogue."""

    gpu: str
    memory_bytes: int
    hbm_gbps: float
    tflops: dict[str, float]
    sm: int
    fp8: bool
    gpus_per_node: int
    nodes: int
    intra_node: Link
    inter_node: Link
    notes: list[str] = field(default_factory=list)

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def peak_flops(self, dtype: str) -> float:
        """FLOP/s for matmuls in `dtype`."""
        return self.tflops[dtype] * 1e12

    def link_for(self, ranks: list[int]) -> Link:
        """The slowest link a group of global ranks talks over (ranks fill nodes in order)."""
        nodes = {r // self.gpus_per_node for r in ranks}
        return self.intra_node if len(nodes) <= 1 else self.inter_node


def _link(kind: str, gbps: float) -> Link:
    return Link(kind, gbps, HOP_LATENCY_US[kind], COLLECTIVE_LATENCY_US[kind])


def resolve_hardware(section: HardwareSection) -> HardwareSpec:
    """Merge catalogue values with the recipe's overrides (all required for `custom`)."""
    base = CATALOGUE.get(section.gpu)
    tflops = {**(base.tflops if base else {}), **(section.tflops or {})}
    sm = section.compute_capability or (base.sm if base else 80)
    fp8 = section.fp8 if section.fp8 is not None else (base.fp8 if base else sm >= 89)
    if not fp8:
        tflops.pop("fp8", None)
    intra_kind = section.intra_node_link or (base.intra_node if base else "pcie")
    intra_gbps = section.intra_node_gbps or (base.intra_node_gbps if base else 25.0)
    inter_kind = section.inter_node_link
    inter_gbps = section.inter_node_gbps or (base.inter_node_gbps if base else 12.5)
    memory_gib = section.memory_gb if section.memory_gb is not None else base.memory_gib
    return HardwareSpec(
        gpu=section.gpu,
        memory_bytes=int(memory_gib * GIB),
        hbm_gbps=section.hbm_gbps or base.hbm_gbps,
        tflops=tflops,
        sm=sm,
        fp8=fp8,
        gpus_per_node=section.gpus_per_node,
        nodes=section.nodes,
        intra_node=_link(intra_kind, intra_gbps),
        inter_node=_link(inter_kind, inter_gbps),
    )


def quantization_refusal(hw: HardwareSpec, weights: str, kv_cache: str) -> tuple[str, str] | None:
    """(field, reason) when the GPU cannot run the requested quantization, else None."""
    why = (f"{hw.gpu} is SM{hw.sm} and has no FP8 tensor cores (FP8 needs compute capability >= 8.9: "
           f"Ada L4/L40S/RTX4090 or Hopper H100/H200)")
    if weights == "fp8" and not hw.fp8:
        return ("quantization.weights",
                f"fp8 cannot run here: {why}; use int8_weight_only (W8A16) or int4_weight_only (W4A16)")
    if kv_cache == "fp8" and not hw.fp8:
        return ("quantization.kv_cache", f"fp8 cannot run here: {why}; use kv_cache: none")
    return None
