"""One generation request as the engine tracks it, and the updates it streams back."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from enginesmith.runtime.engine.sampler import SamplingParams

_seq_ids = itertools.count()


class RequestError(ValueError):
    """A request the engine rejects; the message names the field and the fix."""


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    LENGTH = "length"
    END_ID = "end_id"
    STOP_WORDS = "stop_words"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TokenUpdate:
    """What one iteration produced for one request (sent to its `on_update` callback)."""

    request: Request
    new_tokens: list[int]
    new_log_probs: list[float]
    finished: bool
    error: str | None = None

    def deliver(self) -> None:
        """Hand this update to its request's `on_update`; a callback that raises belongs to a client that is gone:
        the request is marked for cancellation (the engine drops it at its next step)."""
        if self.request.on_update is None:
            return
        try:
            self.request.on_update(self)
        except Exception:
            logging.getLogger(__name__).exception("callback of request %r failed; cancelling it",
                                                  self.request.request_id)
            self.request.cancel_requested = True


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    """The client's id (Triton request id); `stop=true` requests and cancels refer to it."""
    on_update: Callable[[TokenUpdate], None] | None = None
    """Called from the engine thread after every iteration that changed this request."""
    is_cancelled: Callable[[], bool] | None = None
    """Polled every cancellation_check_period_ms (Triton: response_sender.is_cancelled)."""
    arrival_ns: int = field(default_factory=time.monotonic_ns)

    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    tokens: list[int] = field(init=False)
    """prompt + generated tokens."""
    log_probs: list[float] = field(default_factory=list, init=False)
    num_computed: int = field(default=0, init=False)
    """Leading tokens whose K/V are in the cache."""
    context_done: bool = field(default=False, init=False)
    """The context phase (prompt, or recompute after eviction) ended with a sampled token."""
    status: Status = field(default=Status.WAITING, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    error: str | None = field(default=None, init=False)
    cancel_requested: bool = field(default=False, init=False)
    num_preemptions: int = field(default=0, init=False)
    kv_reused_blocks: int = field(default=0, init=False)
    """KV blocks taken from the prefix cache at admission (TensorRT-LLM's kv_cache_reused_blocks)."""
    kv_new_blocks: int = field(default=0, init=False)
    """KV blocks allocated for this request (kv_cache_alloc_new_blocks); with the reused ones, alloc_total."""
    first_scheduled_ns: int = field(default=0, init=False)
    first_token_ns: int = field(default=0, init=False)
    last_token_ns: int = field(default=0, init=False)
    sampler: object = field(default=None, init=False, repr=False)
    """The engine's SequenceSampler for this request."""

    def __post_init__(self):
        self.prompt = [int(t) for t in self.prompt]
        self.tokens = list(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.tokens) - self.num_computed

    @property
    def max_total_len(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    @property
    def is_prefill(self) -> bool:
        """In the context phase: the prompt (or prompt + output after an eviction) is being computed."""
        return not self.context_done

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
