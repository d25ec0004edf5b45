"""Timing a piece of GPU work the way a decode step runs it: captured once in a CUDA graph, replayed."""

from __future__ import annotations

import torch


def time_graph(fn, reps: int = 15, replays: int = 1, barrier=None) -> float:
    """Median ms of one replay of a graph of fn (captured after warm-up on a side stream) over `reps` timed
    rounds of `replays` back-to-back replays each. barrier (ranks timing together, e.g. dist.barrier on a gloo
    group): called after the warm-up and at the start of every round, so the ranks start each round together."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    if barrier is not None:
        torch.cuda.synchronize()
        barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        if barrier is not None:
            torch.cuda.synchronize()
            barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / replays)
    return sorted(times)[len(times) // 2]
