"""How long `serve` waits for a cold server to become ready: sized from the bytes each rank loads.

A rank reads its weights (engine or rank file) before the server answers /v2/health/ready; a cold read
from a network filesystem can run at a few hundred MB/s, so a fixed 300 s kills large loads (~66 GiB a rank
takes ~5 min at 0.25 GB/s). The wait is the load at that conservative rate plus a fixed start-up time,
never below a floor; `--ready-timeout` overrides it.
"""

from __future__ import annotations

LOAD_GBPS = 0.25
"""Conservative load bandwidth, GB/s: a cold read from a network filesystem."""
STARTUP_S = 120.0
"""Fixed start-up: CUDA context, KV-cache allocation, the Python stubs, warm-up."""
FLOOR_S = 300.0


def default_ready_timeout(bytes_per_rank: int) -> float:
    """Seconds to wait for readiness when `bytes_per_rank` bytes of weights are loaded by each rank."""
    return max(FLOOR_S, STARTUP_S + bytes_per_rank / (LOAD_GBPS * 1e9))


def explain(bytes_per_rank: int) -> str:
    """One line saying how the default was reached."""
    return (f"{default_ready_timeout(bytes_per_rank):.0f} s: {bytes_per_rank / 2**30:.1f} GiB per rank at "
            f"{LOAD_GBPS} GB/s + {STARTUP_S:.0f} s start-up, at least {FLOOR_S:.0f} s")
