"""The tp section's all-reduce microbenchmark: one decode-sized (8 KB) TP all-reduce replayed from a CUDA
graph, NCCL against the fast one-shot all-reduce (runtime/parallel/fast_allreduce.py), in microseconds per call.

Collective: every TP rank calls `graph_allreduce_us` with the same arguments.
"""

from __future__ import annotations

import torch


def graph_allreduce_us(groups, device: torch.device, dtype: torch.dtype, nbytes: int = 8192,
                       per_graph: int = 64, replays: int = 20) -> dict:
    """us per all-reduce of `nbytes`, `per_graph` of them back to back in one graph (as in a decode step)."""
    import torch.distributed as dist

    x = torch.zeros(nbytes // dtype.itemsize, dtype=dtype, device=device)
    out: dict = dict(bytes=nbytes, ops_per_graph=per_graph, replays=replays)
    fast = groups.fast_ar
    runs = {"nccl": lambda: dist.all_reduce(x, group=groups.tp_group)}
    if fast is not None and fast.accepts(x):
        runs["fast"] = lambda: fast(x)
    else:
        out["fast_error"] = "fast all-reduce off: " + (fast.reason if fast is not None else "not enabled")
    for name, fn in runs.items():
        try:
            out[f"{name}_us"] = _graph_us(fn, device, groups, per_graph, replays)
        except Exception as e:  # recorded, the section goes on
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if "fast_us" in out and "nccl_us" in out:
        out["speedup"] = out["nccl_us"] / out["fast_us"]
    return out


def _graph_us(fn, device: torch.device, groups, per_graph: int, replays: int) -> float:
    import torch.distributed as dist

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    dist.barrier(group=groups.control)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1e3 / (replays * per_graph)
