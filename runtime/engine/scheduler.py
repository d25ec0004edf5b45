"""In-flight batching scheduler: which requests run in the next iteration, and how many tokens each.

Every iteration the running requests come first (a decode token each, then the next chunk of
unfinished contexts), then waiting requests are admitted first-come-first-served while the batch,
the token budget (max_num_tokens) and the KV cache allow. Capacity policies, as TensorRT-LLM defines them:

- guaranteed_no_evict: a request is admitted only if the blocks for its whole length
  (prompt + request_output_len) can be reserved next to those of all running requests, so a
  running request never waits for a block and is never evicted.
- max_utilization: a request is admitted if the blocks for this iteration's tokens are free;
  when a running request cannot get a block for its next token, the most recently admitted
  requests not yet scheduled in this iteration are paused (their blocks freed) and later
  recompute their prompt + output.

Without chunked context a prompt runs whole in one iteration; with it, a prompt longer than the
token budget is split into chunks of a multiple of tokens_per_block.

With KV-cache reuse (the cache's `enable_reuse`), every iteration first publishes the blocks the last one
completed (a released or paused request's too), and an admitted request takes the cached blocks of its
prompt's longest published prefix: its first chunk starts after them. Admission counts a shared block once
for max_utilization (plus the cached ones it takes out of the free pool); guaranteed_no_evict still sets
aside the blocks of the request's whole length, shared or not, so its guarantee holds unchanged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from enginesmith.runtime.engine.kv_cache import PagedKVCache
from enginesmith.runtime.engine.request import Request, Status

POLICIES = ("guaranteed_no_evict", "max_utilization")


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    request: Request
    start: int
    """First position of the chunk (tokens before it are cached)."""
    num_tokens: int
    is_context: bool

    @property
    def samples(self) -> bool:
        """The chunk reaches the last known token, so the iteration samples the next one."""
        return self.start + self.num_tokens == len(self.request.tokens)


@dataclass(slots=True)
class Schedule:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_context(self) -> int:
        return sum(c.is_context for c in self.chunks)

    @property
    def num_generation(self) -> int:
        return len(self.chunks) - self.num_context


class Scheduler:
    def __init__(self, cache: PagedKVCache, *, max_batch_size: int, max_num_tokens: int,
                 policy: str = "guaranteed_no_evict", enable_chunked_context: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"batch_scheduler_policy={policy!r}: choose one of {', '.join(POLICIES)}")
        self.cache, self.policy = cache, policy
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.enable_chunked_context = enable_chunked_context
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._reserved: dict[int, int] = {}  # guaranteed_no_evict: seq_id -> blocks set aside

    @property
    def num_reserved_blocks(self) -> int:
        return sum(self._reserved.values())

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def release(self, request: Request) -> None:
        """Drop a finished, cancelled or failed request and return its blocks to the pool (its computed
        full blocks stay cached for reuse)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._reserved.pop(request.seq_id, None)
        self._free_blocks(request)

    def _free_blocks(self, req: Request) -> None:
        self.cache.publish(req.seq_id, req.tokens, req.num_computed)
        self.cache.release(req.seq_id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> Schedule:
        out = Schedule()
        budget = self.max_num_tokens
        scheduled: set[int] = set()
        if self.cache.enable_reuse:
            for req in self.running:  # blocks the last iteration completed can be shared from now on
                self.cache.publish(req.seq_id, req.tokens, req.num_computed)
        # Generation requests first, then unfinished (chunked) contexts, then new admissions.
        for req in sorted(self.running, key=lambda r: r.is_prefill):
            if req.status is not Status.RUNNING:
                continue  # paused earlier in this iteration
            n = self._chunk_len(req, budget)
            while n and not self._grow(req, req.num_computed + n):
                victim = next(r for r in reversed(self.running) if r.seq_id not in scheduled)
                out.preempted.append(self._preempt(victim))
                n = 0 if victim is req else n
            if n:
                out.chunks.append(ScheduledChunk(req, req.num_computed, n, req.is_prefill))
                scheduled.add(req.seq_id)
                budget -= n
        while not out.preempted and self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            req = self.waiting[0]  # waiting requests hold no blocks and have nothing computed
            hits = self.cache.match_prefix(req.seq_id, req.tokens)
            start = len(hits) * self.cache.tokens_per_block
            n = self._chunk_len(req, budget, start)
            if not n or not self._can_admit(req, start + n, hits):
                break  # first come, first served: later requests wait behind the head
            self.waiting.popleft()
            self.running.append(req)
            req.status = Status.RUNNING
            if self.policy == "guaranteed_no_evict":
                self._reserved[req.seq_id] = self.cache.blocks_for(req.max_total_len)
            self.cache.attach(req.seq_id, hits, len(req.tokens))
            req.num_computed = start
            req.kv_reused_blocks += len(hits)
            req.kv_new_blocks += self.cache.reserve(req.seq_id, start + n)
            out.chunks.append(ScheduledChunk(req, start, n, True))
            budget -= n
        return out

    def _chunk_len(self, req: Request, budget: int, computed: int | None = None) -> int:
        """Tokens of `req` to run within `budget` after its `computed` ones (default: req.num_computed);
        0: it must wait for a later iteration."""
        need = len(req.tokens) - (req.num_computed if computed is None else computed)
        if need <= budget:
            return need
        if not (self.enable_chunked_context or req.num_preemptions):  # a recompute may always be chunked
            return 0
        tpb = self.cache.tokens_per_block
        return budget // tpb * tpb

    def _can_admit(self, req: Request, num_tokens: int, hits: list[int]) -> bool:
        """Whether `req` may start holding `num_tokens` positions, `hits` of its blocks shared."""
        if self.policy == "guaranteed_no_evict":
            return self.num_reserved_blocks + self.cache.blocks_for(req.max_total_len) <= self.cache.num_blocks
        return self.cache.admission_cost(hits, num_tokens) <= self.cache.num_free_blocks

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make room for `num_tokens` positions of a running request; False if no block is free."""
        need = self.cache.new_blocks_needed(req.seq_id, num_tokens)
        if not need:  # most decode steps: the last block has room
            return True
        if need > self.cache.num_free_blocks:
            if self.policy == "guaranteed_no_evict":
                raise AssertionError("guaranteed_no_evict reserved blocks ran out: reservation bug")
            return False
        req.kv_new_blocks += self.cache.reserve(req.seq_id, num_tokens)
        return True

    def _preempt(self, req: Request) -> Request:
        """max_utilization: pause `req`, free its blocks; it recomputes from scratch when readmitted (with
        reuse, from after whatever of its blocks are still cached)."""
        self.running.remove(req)
        self._free_blocks(req)
        req.num_computed = 0
        req.context_done = False
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        return req
