"""The GPU architecture an engine is compiled for (TensorRT engines run only on the SM they were built for)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuArch:
    """What the build needs to know about the target GPU."""

    kind: str
    """Catalogue kind from `hardware.gpu` (or `custom`)."""
    sm: int
    """Compute capability x10 (80 Ampere, 86 A10, 89 Ada, 90 Hopper)."""
    fp8: bool
    """FP8 tensor cores."""

    @property
    def compute_capability(self) -> str:
        """As nvidia-smi prints it, e.g. "9.0"."""
        return f"{self.sm // 10}.{self.sm % 10}"

    @property
    def is_hopper(self) -> bool:
        return self.sm == 90

    @property
    def label(self) -> str:
        return f"{self.kind} (compute capability {self.compute_capability})"


def gpu_arch_of(hardware) -> GpuArch:
    """The target GPU of a recipe's `hardware` section, resolved against the catalogue."""
    from enginesmith.builders.planner.hardware import resolve_hardware

    hw = resolve_hardware(hardware)
    return GpuArch(kind=hw.gpu, sm=hw.sm, fp8=hw.fp8)
