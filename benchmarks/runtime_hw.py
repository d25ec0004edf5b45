"""The card's two ceilings, measured: device-to-device copy bandwidth and bf16 matrix-product rate."""

from __future__ import annotations

import re
import statistics
import time

import torch


def card_slug(card: str) -> str:
    """The card's short name in result file names: h200, h100, a100, l40s, l4, else the name made a slug."""
    for known in ("h200", "h100", "a100", "l40s", "l4"):
        if known in card.lower():
            return known
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "cpu"


def timed(fn, device: torch.device, repeat: int, warmup: int = 3) -> list[float]:
    """Seconds of each of `repeat` calls after `warmup` calls (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def copy_bandwidth(device: torch.device, nbytes: int, repeat: int = 20) -> dict:
    """Median GB/s of a device-to-device copy, counting bytes read plus bytes written (random data)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = timed(lambda: dst.copy_(src), device, repeat)
    if not torch.equal(dst[:4096], src[:4096]):
        raise RuntimeError("device copy produced wrong bytes")
    med = statistics.median(times)
    return dict(copy_bytes=nbytes, copy_gbps=2 * nbytes / med / 1e9, copy_ms=med * 1e3,
                copy_spread_pct=100 * (max(times) - min(times)) / med)


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeat: int = 20) -> dict:
    """Median TFLOP/s of an n x n x n product on random data."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = timed(lambda: a @ b, device, repeat)
    med = statistics.median(times)
    return dict(matmul_n=n, matmul_dtype=str(dtype).removeprefix("torch."), matmul_tflops=2 * n**3 / med / 1e12)


def run(device: torch.device, tiny: bool) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = copy_bandwidth(device, (16 << 20) if tiny else (2 << 30))
    out |= matmul_rate(device, 256 if tiny else 8192, dtype)
    return out
