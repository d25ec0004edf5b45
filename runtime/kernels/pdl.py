"""Programmatic dependent launch (PDL) for the decode step's Triton kernels (Hopper and newer).

Launched with PDL, a kernel may start while the kernel before it on the stream is still running, once
every program of that one has executed `griddepcontrol.launch_dependents`. The decode kernels use the
head start for what does not depend on the previous kernel (a GEMV loads its first weight tiles), then
`griddepcontrol.wait` (which returns when the previous kernel has finished and its writes are visible)
before they read activations or write anything. So the ramp-up of one kernel overlaps the tail of the
one before it, and inside a CUDA graph the launch gap between them disappears too.

A kernel takes `PDL` as a constexpr (the two instructions are left out when False) and is launched with
`launch_pdl=PDL`; `enabled(device)` decides: compute capability 9.0 or newer, not Triton's interpreter,
and ENGINESMITH_PDL not "0".
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ENV_SWITCH = "ENGINESMITH_PDL"


def enabled(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next kernel start launching."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
