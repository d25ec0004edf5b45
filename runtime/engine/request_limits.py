"""What one request may ask of an engine: its limits, checked before the request is queued.

The engine checks every request it is given; a client in another process (runtime/engine/engine_process.py)
checks them with the same limits first, so a bad request is refused where it arrived."""

from __future__ import annotations

from dataclasses import dataclass

from enginesmith.runtime.engine.engine_config import EngineConfig
from enginesmith.runtime.engine.kv_cache import blocks_for
from enginesmith.runtime.engine.request import Request, RequestError
from enginesmith.runtime.engine.sampler import SamplingError

INT32_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class RequestLimits:
    config: EngineConfig
    vocab_size: int
    num_blocks: int
    """KV blocks of the engine's cache."""

    def validate(self, r: Request) -> None:
        """Raises RequestError naming the field and the fix."""
        c, n = self.config, len(r.prompt)
        if n == 0:
            raise RequestError("input_ids is empty: send at least one prompt token")
        bad = next((t for t in r.prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"input_ids has token id {bad}, outside the vocabulary [0, {self.vocab_size})")
        if not 1 <= r.max_new_tokens <= INT32_MAX:
            raise RequestError(f"request_output_len={r.max_new_tokens} is outside [1, {INT32_MAX}]: "
                               "ask for at least 1 token")
        if n > c.max_input_len:
            raise RequestError(f"input_ids has {n} tokens, more than max_input_len={c.max_input_len}: "
                               "shorten the prompt or rebuild with a larger max_input_len")
        if r.max_total_len > c.max_seq_len:
            raise RequestError(f"{n} input tokens + request_output_len={r.max_new_tokens} exceed "
                               f"max_seq_len={c.max_seq_len}: ask for at most {c.max_seq_len - n} tokens")
        if n > c.max_num_tokens and not c.enable_chunked_context:
            raise RequestError(f"input_ids has {n} tokens, more than max_num_tokens={c.max_num_tokens}: "
                               "enable_chunked_context or shorten the prompt")
        needed = blocks_for(r.max_total_len, c.tokens_per_block)
        if needed > self.num_blocks:
            raise RequestError(f"the request needs {needed} KV blocks but the cache has {self.num_blocks}: "
                               "lower request_output_len or enlarge the cache")
        try:
            r.sampling.validate(self.vocab_size)
        except SamplingError as e:
            raise RequestError(str(e)) from None
