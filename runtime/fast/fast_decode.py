"""Fast decode steps for the reference engine: static buffers, bucketed CUDA graphs, fused kernels.

A pure-decode step (every sequence adds one token) is the common step of in-flight batching. The plain
path builds index tensors on the host and launches ~40 kernels per layer from Python; here the host
only fills one pinned staging buffer (token ids, positions, context lengths, write slots and block
tables padded to the max), copies it in one transfer, and replays the CUDA graph captured for the
step's batch bucket (1, 2, 4, ... max_batch_size; with gather attention also a block-count bucket).
Padding rows repeat row 0, so they write row 0's K/V to row 0's slot and are dropped from the output.

Engine hook: `FastDecoder.for_engine(model, cache, config, groups)` at start-up on every rank (rank 0 in the
engine, the others in runtime/parallel/workers.py), then per step `decoder.plan(sched)` on rank 0 (None: no decode
token in
it, the engine's own path runs) and `decoder.run(step)` on every rank of a single-stage layout: the `FastStep` is
plain data, broadcast to the other ranks with the step's block tables, so all ranks replay the same graphs and meet
in the same collectives (TP all-reduces through the symmetric-memory one-shot kernel or the TP exchange).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from enginesmith.runtime.fast.decode_attention import DecodeAttention, DecodeBatch
from enginesmith.runtime.fast.decode_step import Collective, DecodeStep
from enginesmith.runtime.engine.kv_cache import PagedKVCache
from enginesmith.runtime.model.model import RankModel
from enginesmith.runtime.model.paged_attention import SeqSpan
from enginesmith.runtime.kernels.pdl import enabled as pdl_enabled
from enginesmith.runtime.model.plain_step import plain_forward
from enginesmith.runtime.fast.prefill_graphs import layer_runner

log = logging.getLogger(__name__)


def buckets(limit: int) -> list[int]:
    """Powers of two below `limit`, then `limit`."""
    out = [1]
    while out[-1] * 2 < limit:
        out.append(out[-1] * 2)
    return out if out[-1] == limit else [*out, limit]


@dataclass
class FastStep:
    """One engine step as the fast path runs it, as plain lists (cheap to pickle to the other ranks): the decode
    tokens (through the graphs) and the prefill chunks (through the prefill layers), then the sampling rows."""

    seq_ids: list[int]
    input_ids: list[int]
    positions: list[int]
    rest_spans: list[tuple[int, int, int]]
    """(seq_id, start, num_tokens) of the non-decode chunks."""
    rest_ids: list[int]
    rows: list[int]
    """Row of each sampling chunk in [decode logits; rest logits]."""

    @property
    def seq_ids_all(self) -> list[int]:
        return [*self.seq_ids, *(s[0] for s in self.rest_spans)]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor


class FastDecoder:
    def __init__(self, model: RankModel, cache: PagedKVCache, *, max_batch_size: int, max_seq_len: int,
                 cuda_graphs: bool | None = None, compile: bool | None = None, attention: str = "auto",
                 reduce: Collective | None = None, gather: Collective | None = None,
                 rope_kernel: bool | None = None, gemv: bool | None = None, exchange=None, pdl: bool | None = None,
                 rows: bool | None = None, moe_rows: bool | None = None):
        """cuda_graphs / compile default to on for CUDA caches; attention: auto | triton | gather.
        `reduce` / `gather` are the TP all-reduce and vocab all-gather (ParallelGroups' methods) for tp > 1.
        rope_kernel: the fused rotary + KV-cache write kernel (None: on CUDA, if its self-check passes).
        gemv: batch-1 steps through the fused GEMV kernels (runtime/fast/decode_gemv_step.py; None: on CUDA).
        exchange: a runtime.parallel.tp_exchange.TPExchange (tp > 1): the batch-1 step's all-reduces and logits gather
        go through it (its exchange kernels by default) when it is enabled. pdl: launch the step's Triton
        kernels with programmatic dependent launch (runtime/kernels/pdl.py; None: where
        runtime.kernels.pdl.enabled says so).
        rows: batches of 2..64 through the fused step's small-batch kernels (runtime/kernels/triton_rows.py;
        None: only with
        ENGINESMITH_GEMM_ROWS=1, opt-in: slower than the cuBLAS regions at 32 rows on an H200). moe_rows: MoE
        experts of multi-token steps through runtime/kernels/triton_moe_rows.py (None: on CUDA, if its check passes)."""
        if not (model.is_first_stage and model.is_last_stage):
            raise ValueError("FastDecoder runs single-stage ranks only (pp_size=1)")
        self.model, self.cache = model, cache
        self.device = cache.k.device
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.use_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the KV cache on a CUDA device")
        self.max_batch_size, self.tpb = max_batch_size, cache.tokens_per_block
        self.max_blocks = cache.blocks_for(max_seq_len)
        self.batch_buckets = buckets(max_batch_size)
        self.pdl = pdl_enabled(self.device) if pdl is None else pdl
        self.attention = DecodeAttention(attention, model.num_heads, cache.k[0], max_batch_size, self.pdl)
        self.block_buckets = buckets(self.max_blocks) if self.attention.needs_context_buckets else [self.max_blocks]
        self.step = DecodeStep(model, cache, self.attention, on_cuda if compile is None else compile, reduce, gather,
                               rope_kernel, gemv, exchange, self.pdl, rows, moe_rows)
        # Prefill chunks of mixed steps: the engine's prefill layers (graphed + compiled on CUDA), no TP at tp=1
        self.prefill, self.prefill_reduce = layer_runner(self.device), reduce
        n, w = max_batch_size, self.max_blocks
        self._dev = torch.zeros(5 * n + n * w, dtype=torch.long, device=self.device)
        self._host = torch.zeros(5 * n + n * w, dtype=torch.long, pin_memory=on_cuda)
        self._np = self._host.numpy()
        self._copied = torch.cuda.Event() if on_cuda else None
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None
        self.fallbacks: list[str] = []

    @classmethod
    def for_engine(cls, model: RankModel, cache: PagedKVCache, config, groups=None,
                   **options) -> FastDecoder | None:
        """The engine's decoder on this rank (decode and prefill graphs captured now, while the cache is empty), or
        None where the plain path runs: CPU (unless ENGINESMITH_FAST_DECODE=on), pipeline stages (pp_size > 1:
        their steps run through the graphed prefill layers of runtime/parallel/pipeline.py), or
        ENGINESMITH_FAST_DECODE=0.
        Several TP ranks: every rank calls this at the same point (`groups`: its
        runtime.parallel.groups.ParallelGroups),
        since setting up the one-shot all-reduce, the TP exchange and the graphs are collective."""
        if not fast_path_enabled(cache.k.device):
            return None
        mapping = model.cfg.mapping
        if mapping.pp_size != 1 or (mapping.world_size != 1 and groups is None):
            return None
        if mapping.world_size != 1:
            options = tp_options(model, groups, config.max_batch_size, cache.k.device) | options
        return cls.started(model, cache, config, **options)

    @classmethod
    def started(cls, model: RankModel, cache: PagedKVCache, config, **options) -> FastDecoder:
        """A decoder sized by the engine's config (`options`: the constructor's keywords), with its decode and
        prefill graphs captured now, while the cache is empty."""
        dec = cls(model, cache, max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len, **options)
        dec.capture_all()
        dec.prepare_prefill(config.max_num_tokens)
        return dec

    def prepare_prefill(self, max_num_tokens: int) -> None:
        """Capture the prefill graphs too (GraphedPrefill.prepare), up to the engine's step size."""
        if hasattr(self.prefill, "prepare"):  # run_layers / PrefillLayers: nothing to capture
            self.prefill.prepare(self.model, max_num_tokens)

    def status(self) -> dict:
        return dict(attention=self.attention.kind, attention_note=self.attention.reason, pdl=self.pdl,
                    compile=self.step.compiled,
                    moe=self.step.moe_note, rope_write=self.step.rope_write.note, gemv=self.step.gemv_note,
                    cuda_graphs=self.use_graphs, graphs=len(self._graphs), batch_buckets=self.batch_buckets,
                    block_buckets=self.block_buckets,
                    prefill=self.prefill.status() if hasattr(self.prefill, "status") else "eager",
                    fallbacks=[*self.attention.fallbacks, *self.step.fallbacks, *self.fallbacks])

    # ---- the step ----
    def plan(self, sched) -> FastStep | None:
        """The step's split into decode tokens and prefill chunks; None when no chunk is a decode token the graphs
        can take (the engine's own path runs)."""
        chunks = sched.chunks
        fast = [c.num_tokens == 1 and c.samples and c.start < self.max_blocks * self.tpb for c in chunks]
        n_fast = sum(fast)
        if not n_fast or n_fast > self.max_batch_size:
            return None
        dec = [c for c, f in zip(chunks, fast, strict=True) if f]
        rest = [c for c, f in zip(chunks, fast, strict=True) if not f]
        rows, fast_row, rest_row = [], iter(range(n_fast)), iter(range(n_fast, n_fast + len(rest)))
        for c, f in zip(chunks, fast, strict=True):
            row = next(fast_row) if f else next(rest_row)
            if c.samples:
                rows.append(row)
        return FastStep([c.request.seq_id for c in dec], [c.request.tokens[c.start] for c in dec],
                        [c.start for c in dec], [(c.request.seq_id, c.start, c.num_tokens) for c in rest],
                        [t for c in rest for t in c.request.tokens[c.start: c.start + c.num_tokens]], rows)

    def run(self, step: FastStep) -> torch.Tensor:
        """Decode tokens through the graphs, prefill chunks of the same step through the prefill layers (they touch
        other sequences' blocks only); logits of the sampling rows."""
        logits = self.decode(step.seq_ids, step.input_ids, step.positions)
        if not step.rest_spans:
            return logits  # every decode token samples: rows are 0..n-1
        spans = [SeqSpan(*s) for s in step.rest_spans]
        rest_logits = plain_forward(self.model, self.cache, spans, step.rest_ids, self.prefill_reduce,
                                    self.step.gather, self.prefill)
        return torch.cat([logits, rest_logits])[torch.tensor(step.rows, device=logits.device)]

    @torch.inference_mode()
    def decode(self, seq_ids: list[int], input_ids: list[int] | torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One token per sequence at `positions` (its blocks reserved) -> (B, vocab) float32 logits.
        input_ids may be a (B,) integer tensor on the decoder's device (e.g. the previous step's argmax): then
        the step reads it there, and nothing waits for the GPU (no host sync per token; the host blocks only
        on the staging copy of the step before, so it runs at most one step ahead)."""
        b = len(seq_ids)
        if not 0 < b <= self.max_batch_size or len(input_ids) != b or len(positions) != b:
            raise ValueError(f"decode got {b} sequences, {len(input_ids)} ids and {len(positions)} positions "
                             f"(1..max_batch_size={self.max_batch_size} of each)")
        on_device = isinstance(input_ids, torch.Tensor)
        if on_device and (input_ids.device != self.device or input_ids.dim() != 1):
            raise ValueError(f"input_ids as a tensor must be 1-d on {self.device}, got {tuple(input_ids.shape)} "
                             f"on {input_ids.device}")
        bucket = next(x for x in self.batch_buckets if x >= b)
        need = self._stage(seq_ids, [0] * b if on_device else input_ids, positions, bucket)
        if on_device:  # after the staging copy, in stream order; padding rows repeat row 0's id like its slot
            ids = self._dev[:bucket]
            ids[:b].copy_(input_ids)
            ids[b:].copy_(input_ids[:1].expand(bucket - b))
        nblk = next(x for x in self.block_buckets if x >= need)
        out = self._run(bucket, nblk)
        return out[:b, : self.model.cfg.vocab_size].clone()

    def _stage(self, seq_ids: list[int], input_ids: list[int], positions: list[int], bucket: int) -> int:
        """Fill the pinned staging buffer and copy it to the device; returns the block columns needed."""
        n, w, tpb, b = self.max_batch_size, self.max_blocks, self.tpb, len(seq_ids)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the buffer
        h = self._np
        ids, pos, ctx, src, slots = (h[i * n: i * n + bucket] for i in range(5))
        table = h[5 * n:].reshape(n, w)
        for r, (sid, p) in enumerate(zip(seq_ids, positions, strict=True)):
            t = self.cache.block_table(sid)
            if not 0 <= p < min(len(t), w) * tpb:
                raise ValueError(f"sequence {sid} has no KV block for position {p} (table of {len(t)} blocks, "
                                 f"max_seq_len allows {w}): reserve blocks first")
            k = min(len(t), w)
            table[r, :k] = t[:k]
            slots[r] = t[p // tpb] * tpb + p % tpb
        ids[:b], pos[:b] = input_ids, positions
        src[:b] = np.arange(b)
        ids[b:], pos[b:], slots[b:], src[b:] = ids[0], pos[0], slots[0], 0
        table[b:bucket] = table[0]
        ctx[:] = pos + 1
        self._dev.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return max(positions) // tpb + 1

    def _views(self, bucket: int, nblk: int):
        n, d = self.max_batch_size, self._dev
        ids, pos, ctx, src, slots = (d[i * n: i * n + bucket] for i in range(5))
        table = d[5 * n:].view(n, self.max_blocks)[:bucket]
        return ids, pos, DecodeBatch(slots, src, table, ctx, nblk)

    def _run(self, bucket: int, nblk: int) -> torch.Tensor:
        if not self.use_graphs:
            return self._eager(bucket, nblk)
        g = self._graphs.get((bucket, nblk)) or self._capture(bucket, nblk)
        if g is None:
            return self._eager(bucket, nblk)
        g.graph.replay()
        return g.out

    def _eager(self, bucket: int, nblk: int) -> torch.Tensor:
        try:
            return self.step(*self._views(bucket, nblk))
        except Exception as e:
            if not self.step.compiled:
                raise
            self._fall_back(f"torch.compile failed, running eager regions: {type(e).__name__}: {e}")
            self.step.disable_compile()
            return self.step(*self._views(bucket, nblk))

    # ---- CUDA graphs ----
    def capture_all(self) -> None:
        """Capture every bucket now (largest first, sharing one memory pool). The dummy steps write block 0,
        so the cache must hold no sequence yet."""
        if not self.use_graphs:
            return
        if self.cache.num_used_blocks:
            raise RuntimeError(f"capture_all needs an empty KV cache ({self.cache.num_used_blocks} blocks in use)")
        with torch.inference_mode():
            self._np[:] = 0
            self._np[2 * self.max_batch_size: 3 * self.max_batch_size] = 1  # context length 1 at position 0
            self._dev.copy_(self._host)
            for bucket in reversed(self.batch_buckets):
                for nblk in reversed(self.block_buckets):
                    if self.use_graphs and (bucket, nblk) not in self._graphs:
                        self._capture(bucket, nblk)

    def _capture(self, bucket: int, nblk: int) -> _Graph | None:
        """Warm up (compiles, autotunes, initialises cuBLAS/NCCL) on a side stream, then capture. Warm-up steps
        rewrite the staged rows' K/V with the same values, so capturing mid-serving is harmless."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._eager(bucket, nblk)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.step(*self._views(bucket, nblk))
        except Exception as e:
            self._fall_back(f"CUDA graph capture failed, running without graphs: {type(e).__name__}: {e}")
            self.use_graphs = False
            torch.cuda.synchronize(self.device)
            return None
        self._pool = self._pool or graph.pool()
        self._graphs[(bucket, nblk)] = g = _Graph(graph, out)
        return g

    def _fall_back(self, reason: str) -> None:
        log.warning("fast decode: %s", reason)
        self.fallbacks.append(reason[:500])


FAST_DECODE_ENV = "ENGINESMITH_FAST_DECODE"


def fast_path_enabled(device: torch.device) -> bool:
    """ENGINESMITH_FAST_DECODE: unset or 1: on CUDA; 0: never; on: also on CPU (eager, no graphs: for tests)."""
    mode = os.environ.get(FAST_DECODE_ENV, "1").strip().lower()
    if mode not in ("0", "1", "on"):
        raise ValueError(f"{FAST_DECODE_ENV}={mode!r}: use 1 (CUDA only, the default), on (also CPU) or 0 (off)")
    return mode == "on" or (mode == "1" and device.type == "cuda")


def tp_options(model: RankModel, groups, max_batch_size: int, device: torch.device) -> dict:
    """FastDecoder keywords of one TP rank: the group's all-reduce (decode-sized tensors through the one-shot
    symmetric-memory kernel where it checks out) and vocab gather, and on CUDA the TP exchange for batch-1 steps.
    Collective: every rank of the TP group calls it at the same point."""
    max_bytes = max_batch_size * model.cfg.hidden_size * torch.empty((), dtype=model.dtype).element_size()
    status = groups.enable_fast_all_reduce(max_bytes, model.dtype, device)
    log.info("rank %d all-reduce: %s", groups.rank, status)
    exchange = None
    if device.type == "cuda":
        from enginesmith.runtime.parallel.tp_exchange import for_model

        exchange = for_model(groups, model, device)
        exchange = exchange if exchange.serves(model.cfg.is_moe) else None
    return dict(reduce=groups.all_reduce_tp, gather=groups.gather_tp_last_dim, exchange=exchange)

