"""The reference engine: in-flight batching over a RankModel with a paged KV cache.

A background thread repeats one iteration: take new requests and cancellations, schedule (decode
tokens + prefill chunks), run the model once over the packed tokens, sample, and stream each new
token at once through the request's callback. Finished, cancelled and failed requests give their
KV blocks back before their last callback, so a client that saw the end sees the blocks freed.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from enginesmith.runtime.engine.engine_config import EngineConfig, read_engine_dir
from enginesmith.runtime.fast.fast_decode import FastDecoder
from enginesmith.runtime.engine.iteration_log import IterationLog, IterationStats
from enginesmith.runtime.engine.kv_cache import PagedKVCache, kv_cache_num_blocks
from enginesmith.runtime.model.paged_attention import PagedAttention, SeqSpan
from enginesmith.runtime.parallel.pipeline import MicroBatch
from enginesmith.runtime.fast.prefill_graphs import layer_runner
from enginesmith.runtime.engine.request import FinishReason, Request, RequestError, Status, TokenUpdate
from enginesmith.runtime.engine.request_limits import RequestLimits
from enginesmith.runtime.engine.sampler import (
    NO_TOKEN,
    NOTHING_TO_SAMPLE,
    SequenceSampler,
    ends_with_stop_word,
    sample,
)
from enginesmith.runtime.engine.scheduler import Schedule, Scheduler

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: Any, config: EngineConfig, *, metrics: Any = None, workers: Any = None,
                 num_blocks: int | None = None, decoder_options: dict | None = None):
        """`model` follows runtime/model/model.py's RankModel contract: every layer on one rank, or rank 0 of a
        multi-rank checkpoint whose other ranks `workers` (runtime.parallel.workers.RankWorkers) drives.
        `decoder_options`: FastDecoder keywords (benchmarks compare kernel paths through them)."""
        self.model, self.config, self.metrics, self.workers = model, config, metrics, workers
        self.vocab_size = model.cfg.vocab_size
        dims = dict(num_layers=model.num_local_layers, num_kv_heads=model.num_kv_heads, head_size=model.head_size)
        num_blocks = num_blocks or kv_cache_blocks(model, config)
        self.cache = PagedKVCache(**dims, num_blocks=num_blocks, tokens_per_block=config.tokens_per_block,
                                  dtype=model.dtype, device=model.device, enable_reuse=config.enable_kv_cache_reuse)
        # CUDA: decode tokens through captured graphs on every rank of a single-stage layout (None on CPU, with
        # pipeline stages, or ENGINESMITH_FAST_DECODE=0); the worker ranks build theirs at the same point.
        self.fast_decoder = FastDecoder.for_engine(model, self.cache, config,
                                                   workers.groups if workers is not None else None,
                                                   **(decoder_options or {}))
        self.fast_steps = self.plain_steps = 0
        self.scheduler = Scheduler(self.cache, max_batch_size=config.max_batch_size,
                                   max_num_tokens=config.max_num_tokens, policy=config.batch_scheduler_policy,
                                   enable_chunked_context=config.enable_chunked_context)
        self.limits = RequestLimits(config, self.vocab_size, num_blocks)
        self.iteration_log = IterationLog(config.iteration_log_path)
        self._iteration = 0
        self._wake = threading.Condition()
        self._inbox: list[Request] = []
        self._cancel_ids: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_poll_ns = 0
        self.on_step_end: Callable[[], None] | None = None
        """Called from the loop after each iteration, and after the idle metrics hook (an engine in its own
        process sends what the iteration's callbacks gathered as one message: runtime/engine/engine_process.py)."""

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, *, device: str | None = None, metrics: Any = None,
                        init_method: str | None = None, on_rank_failure: Any = None, liveness: Any = None,
                        **overrides: Any) -> Engine:
        """Load the model named by `engine_dir/engine_config.json`; a multi-rank checkpoint spawns its
        other ranks (`on_rank_failure(rank, reason)` is called if one dies or hangs; `liveness`: a
        runtime.parallel.liveness.Liveness, default from the environment)."""
        from enginesmith.runtime.model.checkpoint import CheckpointConfig
        from enginesmith.runtime.model.model import RankModel

        config, ckpt_dir = read_engine_dir(engine_dir, **overrides)
        mapping = CheckpointConfig.from_dir(ckpt_dir).mapping
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if mapping.world_size == 1:
            return cls(RankModel.load(ckpt_dir, 0, device=device, dtype=config.dtype), config, metrics=metrics)
        from enginesmith.runtime.parallel.workers import RankWorkers, free_init_method

        model = RankModel.load(ckpt_dir, 0, device=device, dtype=config.dtype)
        num_blocks = kv_cache_blocks(model, config)
        workers = RankWorkers(ckpt_dir, mapping, config.dtype, num_blocks, config.tokens_per_block,
                              init_method or free_init_method(), on_failure=on_rank_failure, liveness=liveness,
                              engine_config=config)
        return cls(model, config, metrics=metrics, workers=workers, num_blocks=num_blocks)

    # ---- client side (any thread) ----
    def submit(self, request: Request) -> None:
        """Queue a request (raises RequestError naming the bad field)."""
        self.validate(request)
        request.sampler = SequenceSampler(request.sampling, request.tokens, len(request.prompt),
                                          self.vocab_size, self.cache.k.device)
        with self._wake:
            if self._stopping:
                raise RequestError("the engine is shutting down")
            self._inbox.append(request)
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        """Cancel every in-flight request with this client id (Triton `stop=true`)."""
        with self._wake:
            self._cancel_ids.add(request_id)
            self._wake.notify()

    def validate(self, r: Request) -> None:
        """Raises RequestError naming the field and the fix (runtime/engine/request_limits.py)."""
        self.limits.validate(r)

    # ---- the loop ----
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="reference-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight fail with 'engine shut down'."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for req in [*self._inbox, *self.scheduler.running, *self.scheduler.waiting]:
            self._finish(req, FinishReason.FAILED, error="the engine shut down before the request finished")
        self._inbox.clear()
        self.iteration_log.close()
        if self.workers is not None:
            self.workers.close()

    def _loop(self) -> None:
        period_s = self.config.cancellation_check_period_ms / 1000
        while True:
            if not self._has_input() and self.metrics is not None:
                idle = getattr(self.metrics, "on_idle", None) or getattr(self.metrics, "flush", None)
                if idle is not None:
                    _call(idle)  # going idle: nothing is scheduled any more; publish the final state now
                self._step_ended()
            with self._wake:
                while not self._has_input():
                    self._wake.wait()
                if self._stopping:
                    return
                new, self._inbox = self._inbox, []
                cancel_ids, self._cancel_ids = self._cancel_ids, set()
            try:
                if self.step(new, cancel_ids) is None and self.scheduler.has_work():
                    with self._wake:  # nothing could run (e.g. blocks pending release): don't spin
                        self._wake.wait(min(period_s, 0.01))
            except Exception:  # a bug must not kill the loop silently: fail everything in flight
                log.exception("reference engine iteration failed")
                for req in [*self.scheduler.running, *self.scheduler.waiting]:
                    self._finish(req, FinishReason.FAILED, error="internal error in the reference engine")
            self._step_ended()

    def _step_ended(self) -> None:
        if self.on_step_end is not None:
            try:
                self.on_step_end()
            except Exception:
                log.exception("the engine's step-end hook failed")

    def _has_input(self) -> bool:
        return bool(self._stopping or self._inbox or self._cancel_ids or self.scheduler.has_work())

    def step(self, new: list[Request] = (), cancel_ids: set[str] = frozenset()) -> IterationStats | None:
        """One iteration (the loop calls it; tests may call it directly instead of start())."""
        start_ns = time.monotonic_ns()
        for req in new:
            self.scheduler.add(req)
        released = self._apply_cancellations(cancel_ids, start_ns)
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return self._record(start_ns, sched, released) if released else None
        for chunk in sched.chunks:
            chunk.request.first_scheduled_ns = chunk.request.first_scheduled_ns or start_ns
        sampling = [c for c in sched.chunks if c.samples]
        try:
            logits = self._forward(sched)
            tokens, log_probs = sample(logits, [c.request.sampler for c in sampling])
        except Exception as e:
            log.exception("reference engine forward/sampling failed")
            for chunk in sched.chunks:
                self._finish(chunk.request, FinishReason.FAILED, error=f"{type(e).__name__}: {e}")
            return self._record(start_ns, sched, released + len(sched.chunks))
        for chunk in sched.chunks:
            chunk.request.num_computed += chunk.num_tokens
        for chunk, tok, lp in zip(sampling, tokens, log_probs, strict=True):
            released += self._append(chunk.request, tok, lp)
        return self._record(start_ns, sched, released)

    def run_until_idle(self) -> None:
        """Synchronous driver for tests: iterate until every queued request is done."""
        new, self._inbox = self._inbox, []
        self.step(new)
        while self.scheduler.has_work():
            self.step()

    @torch.inference_mode()
    def _forward(self, sched: Schedule) -> torch.Tensor:
        """Run the packed step; (num sampling chunks, vocab) float32 logits."""
        if self.fast_decoder is not None and (step := self.fast_decoder.plan(sched)) is not None:
            self.fast_steps += 1
            if self.workers is not None:
                return self.workers.forward_fast(self.fast_decoder, self.cache, step)
            return self.fast_decoder.run(step)
        self.plain_steps += 1
        ids, positions, spans, last_rows, row = [], [], [], [], 0
        for c in sched.chunks:
            ids.extend(c.request.tokens[c.start: c.start + c.num_tokens])
            positions.extend(range(c.start, c.start + c.num_tokens))
            spans.append(SeqSpan(c.request.seq_id, c.start, c.num_tokens))
            row += c.num_tokens
            if c.samples:
                last_rows.append(row - 1)
        m, device = self.model, self.cache.k.device
        if self.workers is not None:
            from enginesmith.runtime.parallel.workers import MicroBatchSpec

            spec = MicroBatchSpec(ids, positions, [(s.seq_id, s.start, s.num_tokens) for s in spans], last_rows)
            return self.workers.forward(m, self.cache, spec, self.config.pp_micro_batches)
        mb = MicroBatch(input_ids=torch.tensor(ids, dtype=torch.long, device=device),
                        positions=torch.tensor(positions, dtype=torch.long, device=device),
                        logit_rows=torch.tensor(last_rows, dtype=torch.long, device=device),
                        attn=PagedAttention(self.cache, spans))
        hidden = layer_runner(m.device)(m, None, m.embed(mb.input_ids), mb)
        if not last_rows:
            return torch.empty(0, self.vocab_size)
        return m.final_logits_shard(hidden[mb.logit_rows])[:, : self.vocab_size]

    def _append(self, req: Request, token: int, log_prob: float) -> int:
        """Record a sampled token, stream it, finish the request if it is done; returns 1 if finished."""
        now = time.monotonic_ns()
        req.context_done = True
        if self.metrics is not None:
            _call(self.metrics.on_token if req.first_token_ns else self.metrics.on_first_token,
                  (now - (req.last_token_ns or req.arrival_ns)) / 1e9)
        req.first_token_ns = req.first_token_ns or now
        req.last_token_ns = now
        if token == NO_TOKEN:
            self._finish(req, FinishReason.FAILED, error=NOTHING_TO_SAMPLE)
            return 1
        p = req.sampling
        if p.end_id is not None and token == p.end_id:
            self._finish(req, FinishReason.END_ID)
            return 1
        req.tokens.append(token)
        req.log_probs.append(log_prob)
        reason = (FinishReason.STOP_WORDS if p.stop_words and ends_with_stop_word(req.tokens, p.stop_words)
                  else FinishReason.LENGTH if len(req.tokens) >= req.max_total_len else None)
        if reason is not None:
            self._finish(req, reason, [token], [log_prob])
            return 1
        TokenUpdate(req, [token], [log_prob], False).deliver()
        return 0

    def _apply_cancellations(self, cancel_ids: set[str], now_ns: int) -> int:
        poll = now_ns - self._last_poll_ns >= self.config.cancellation_check_period_ms * 1_000_000
        if poll:
            self._last_poll_ns = now_ns
        released = 0
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            if (req.cancel_requested or (req.request_id and req.request_id in cancel_ids)
                    or (poll and req.is_cancelled is not None and _safe_bool(req.is_cancelled))):
                self._finish(req, FinishReason.CANCELLED)
                released += 1
        return released

    def _finish(self, req: Request, reason: FinishReason, tokens: list[int] = (), log_probs: list[float] = (),
                error: str | None = None) -> None:
        if req.finished:
            return
        req.status, req.finish_reason, req.error = Status.FINISHED, reason, error
        self.scheduler.release(req)
        if self.metrics is not None:
            _call(self.metrics.on_request_done, len(req.prompt), len(req.output))
        TokenUpdate(req, list(tokens), list(log_probs), True, error).deliver()

    def _record(self, start_ns: int, sched: Schedule, released: int) -> IterationStats:
        s = self.scheduler
        stats = IterationStats(
            iteration=self._iteration, start_ns=start_ns, duration_ns=time.monotonic_ns() - start_ns,
            batch_size=len(sched.chunks), num_context=sched.num_context, num_generation=sched.num_generation,
            num_tokens=sched.num_tokens, num_context_tokens=sum(c.num_tokens for c in sched.chunks if c.is_context),
            kv_used_blocks=self.cache.num_used_blocks,
            kv_free_blocks=self.cache.num_free_blocks, active=len(s.running), queued=len(s.waiting),
            paused=len(sched.preempted), released=released, kv_reused_blocks=self.cache.reused_blocks,
            kv_missed_blocks=self.cache.missed_blocks)
        self._iteration += 1
        self.iteration_log.append(stats)
        if self.metrics is not None:
            _call(self.metrics.on_iteration, stats.batch_size, stats.num_context, stats.num_generation,
                  stats.kv_used_blocks, stats.kv_free_blocks, stats.active, stats.queued,
                  num_context_tokens=stats.num_context_tokens, paused=stats.paused,
                  kv_reused_blocks=stats.kv_reused_blocks, kv_missed_blocks=stats.kv_missed_blocks)
        return stats


def kv_cache_blocks(model: Any, config: EngineConfig) -> int:
    """KV blocks of the pool; every rank uses rank 0's count (rank 0 holds the most layers)."""
    dims = dict(num_layers=model.num_local_layers, num_kv_heads=model.num_kv_heads, head_size=model.head_size)
    return kv_cache_num_blocks(
        tokens_per_block=config.tokens_per_block, max_batch_size=config.max_batch_size,
        max_seq_len=config.max_seq_len, bytes_per_token=PagedKVCache.bytes_per_token(**dims, dtype=model.dtype),
        max_tokens_in_paged_kv_cache=config.max_tokens_in_paged_kv_cache,
        free_mem_fraction=config.kv_cache_free_gpu_mem_fraction, free_bytes=_free_bytes(model.device))


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def _call(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:
        log.exception("metrics hook %s failed", getattr(fn, "__name__", fn))


def _safe_bool(fn) -> bool:
    try:
        return bool(fn())
    except Exception:
        return True  # a sender that cannot answer belongs to a client that is gone
