"""Piecewise CUDA graphs for prefill on a rank without TP: each layer's compiled regions replayed from graphs.

Even compiled, a prefill layer costs ~0.6 ms of host time (two compiled-region calls with their guards and
wrappers, a few launches) while a 1024-token micro-batch of Llama-3-8B takes ~0.75 ms of GPU time per
layer on an H200: small prefills and pipeline micro-batches were host-bound. Here every layer's two
regions (runtime/fast/prefill_layers.py: norm + QKV + rotary; output projection + norm + MLP) are captured
once per token bucket into CUDA graphs over static buffers, as vLLM's piecewise graphs do; attention
runs eagerly between them on the step's real rows (its index tensors and cache writes change every
step). A step of T tokens is padded to the smallest bucket >= T: the regions work row by row, so the
padding rows never touch the real ones, and attention never sees them.

Graphs are captured by `prepare` (the engine calls it at start, up to max_num_tokens) or at a bucket's first
use, after a warm-up run that compiles and autotunes at that size, into one memory pool: every graph leaves
only the shared static buffers alive, so they reuse one set of temporaries. The first graphed step is
checked against the compiled regions; a capture error or a mismatch falls back to them for good
(`fallback`). Steps with a TP all-reduce, MoE layers, or more tokens than the largest bucket run the
compiled regions.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from enginesmith.runtime.model.attention import DenseCausalAttention
from enginesmith.runtime.kernels.gemv_ref import rel_err
from enginesmith.runtime.model.model import RankModel
from enginesmith.runtime.parallel.pipeline import MicroBatch, run_layers
from enginesmith.runtime.fast.prefill_layers import LayerRunner, PrefillLayers

log = logging.getLogger(__name__)
BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192)
"""Token buckets (padded step sizes) that get graphs; larger steps run the compiled regions."""


class _Replay:
    """Stand-in for a CUDA graph off CUDA (tests): replay re-runs the recorded body."""

    def __init__(self, body: Callable[[], None]):
        self.body = body

    def replay(self) -> None:
        self.body()


class _Bucket:
    """Static buffers of one token bucket and every layer's (pre, post) graph over them."""

    def __init__(self, model: RankModel, regions: PrefillLayers, size: int):
        self.model, self.regions, self.size = model, regions, size
        h, d, nq, nkv = model.cfg.hidden_size, model.head_size, model.num_heads, model.num_kv_heads
        new = dict(device=model.device, dtype=model.dtype)
        with torch.inference_mode(False):  # normal tensors: written in place under inference_mode and no_grad alike
            self.h, self.m, self.o = (torch.zeros(size, n, **new) for n in (h, h, nq * d))
            self.q, self.k, self.v = (torch.zeros(size, n, d, **new) for n in (nq, nkv, nkv))
            self.cos, self.sin = (torch.zeros(size, d, **new) for _ in range(2))
        self.graphs: list[tuple] = []

    def pre(self, i: int) -> None:
        """Layer i up to attention: h (+ m) -> h, q, k, v, all in the static buffers."""
        m, w = self.model, self.model.layers[i]
        h, q, k, v = self.regions.pre(self.h, self.m if i else None, w.input_layernorm, w.qkv, w.qkv_bias, self.cos,
                                      self.sin, m.cfg.norm_epsilon, m.num_heads, m.num_kv_heads, m.head_size)
        if i:
            self.h.copy_(h)
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)

    def post(self, i: int) -> None:
        """Layer i after attention: o -> output projection, residual add, norm, MLP -> h, m."""
        w = self.model.layers[i]
        a = F.linear(self.o, w.dense)
        h, m = self.regions.mlp(self.h, a, w.post_layernorm, w.gate_up, w.proj, self.model.cfg.norm_epsilon)
        self.h.copy_(h)
        self.m.copy_(m)

    def capture(self, pool) -> object:
        """Warm up at this size on a side stream (compiles, autotunes), then capture every layer's two graphs."""
        layers = range(self.model.num_local_layers)
        if self.model.device.type != "cuda":  # run each body once, as a capture traces it
            for i in layers:
                self.pre(i)
                self.post(i)
            self.graphs = [(_Replay(lambda i=i: self.pre(i)), _Replay(lambda i=i: self.post(i))) for i in layers]
            return pool
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for i in range(min(2, len(layers))):  # layer 0 (no m) and a later one
                self.pre(i)
                self.post(i)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        for i in layers:
            pair = []
            for body in (self.pre, self.post):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    body(i)
                pool = pool or graph.pool()
                pair.append(graph)
            self.graphs.append(tuple(pair))
        return pool

    def run(self, hidden: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        t = hidden.shape[0]
        self.h[:t].copy_(hidden)
        cos, sin = self.model.rope(mb.positions)
        self.cos[:t].copy_(cos)
        self.sin[:t].copy_(sin)
        for i, (pre, post) in enumerate(self.graphs):
            pre.replay()
            out = mb.attn(i, self.q[:t], self.k[:t], self.v[:t])
            self.o[:t].copy_(out.reshape(t, -1))
            post.replay()
        return self.h[:t] + self.m[:t]


class GraphedPrefill:
    """A LayerRunner: PrefillLayers' regions replayed from per-layer CUDA graphs where it can, else run by it."""

    def __init__(self, regions: PrefillLayers, buckets: tuple[int, ...] = BUCKETS):
        self.regions, self.buckets = regions, tuple(sorted(buckets))
        self.fallback, self.checked = "", False
        self._buckets: weakref.WeakKeyDictionary[RankModel, dict[int, _Bucket]] = weakref.WeakKeyDictionary()
        self._pool = None

    def __call__(self, model: RankModel, reduce: Callable | None, hidden: torch.Tensor,
                 mb: MicroBatch) -> torch.Tensor:
        t = hidden.shape[0]
        if reduce is not None or t > self.buckets[-1] or not self._usable(model):
            return self.regions(model, reduce, hidden, mb)
        bucket = self._bucket(model, next(b for b in self.buckets if b >= t))
        if bucket is None:
            return self._fall_back(self.fallback, model, hidden, mb)
        out = bucket.run(hidden, mb)
        if not self.checked:
            self.checked = True
            want = self.regions(model, None, hidden, mb)
            if (err := rel_err(out, want)) > 2e-2:
                return self._fall_back(f"graphed prefill differs from the compiled regions (relative error "
                                       f"{err:.2e})", model, hidden, mb)
        return out

    @torch.inference_mode()  # as the engine's steps run: compiled graphs are guarded on the grad mode
    def prepare(self, model: RankModel, max_tokens: int) -> list[int]:
        """Compile and capture every bucket a step of up to `max_tokens` can use, now (at engine start, as the
        decode graphs are) rather than at the first prompt of each size; returns the sizes captured."""
        if not self._usable(model):
            return []
        sizes = [b for b in self.buckets if b < max_tokens] + [b for b in self.buckets if b >= max_tokens][:1]
        for size in sizes:
            if self._bucket(model, size) is None:
                self._give_up(self.fallback, model)
                return []
        # The graphs ran the regions on the buckets' normal tensors; steps (and the first step's check) pass
        # inference tensors, which Dynamo guards apart: compile those variants now too, on a few tokens.
        n = 4
        mb = MicroBatch(torch.zeros(n, dtype=torch.long, device=model.device),
                        torch.arange(n, device=model.device), torch.tensor([n - 1], device=model.device),
                        DenseCausalAttention([n]))
        self.regions(model, None, torch.zeros(n, model.cfg.hidden_size, device=model.device, dtype=model.dtype), mb)
        return sizes

    def _usable(self, model: RankModel) -> bool:
        """Graphs serve this model: its compiled regions passed their check, no fallback, no MoE layer."""
        if self.regions.compiled and not self.regions.checked:
            self.regions.check(model)
        return not (self.fallback or self.regions.fallback or any(w.gate_up is None for w in model.layers))

    def _bucket(self, model: RankModel, size: int) -> _Bucket | None:
        """The model's bucket of `size`, captured at its first use; None (and `fallback` set) if capture fails."""
        per_model = self._buckets.setdefault(model, {})
        if size not in per_model:
            bucket = _Bucket(model, self.regions, size)
            try:
                self._pool = bucket.capture(self._pool)
            except Exception as e:  # a capture error must not take the engine down: the compiled regions work
                self.fallback = f"CUDA graph capture failed: {type(e).__name__}: {e}"[:500]
                return None
            per_model[size] = bucket
        return per_model[size]

    def status(self) -> dict:
        sizes = sorted({s for per_model in self._buckets.values() for s in per_model})
        return self.regions.status() | dict(graph_buckets=sizes, fallback=self.fallback or self.regions.fallback)

    def _fall_back(self, reason: str, model: RankModel, hidden: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        """Drop the graphs for good and run this step through the compiled regions."""
        self._give_up(reason, model)
        return self.regions(model, None, hidden, mb)

    def _give_up(self, reason: str, model: RankModel) -> None:
        """Record why, log it, and free every bucket's graphs and buffers: the compiled regions serve from now on."""
        self.fallback = reason[:500]
        log.warning("prefill graphs: %s", self.fallback)
        self._buckets, self._pool = weakref.WeakKeyDictionary(), None
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)


_runner: GraphedPrefill | PrefillLayers | None = None


def layer_runner(device: torch.device | str) -> LayerRunner:
    """The prefill LayerRunner for `device`, one per process: on CUDA GraphedPrefill over compiled regions
    (ENGINESMITH_PREFILL_GRAPHS=0: the compiled regions alone; ENGINESMITH_PREFILL_COMPILE=0: run_layers),
    elsewhere run_layers."""
    global _runner
    if torch.device(device).type != "cuda" or os.environ.get("ENGINESMITH_PREFILL_COMPILE", "1") == "0":
        return run_layers
    graphs = os.environ.get("ENGINESMITH_PREFILL_GRAPHS", "1") != "0"
    if _runner is None or isinstance(_runner, GraphedPrefill) != graphs:
        regions = _runner.regions if isinstance(_runner, GraphedPrefill) else _runner or PrefillLayers(compile=True)
        _runner = GraphedPrefill(regions) if graphs else regions
    return _runner
