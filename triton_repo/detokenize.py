"""Incremental detokenization: text deltas of a growing token sequence.

Decoding each streamed chunk on its own (upstream's postprocessing) loses the leading space of
SentencePiece pieces and splits multi-byte UTF-8 characters whose bytes span two chunks. Instead we keep
the sequence and decode a small window with and without the new tokens (text-generation-inference's
prefix/read offsets), and hold back a tail that ends in an incomplete character (decoded as U+FFFD).
Joining the deltas gives exactly `decode(all tokens)` (save a trailing incomplete character, which `flush`
returns). `decode` is any batch decoder, so the BLS can use the postprocessing model through BLS calls.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
BatchDecode = Callable[[list[list[int]]], list[str]]


class IncrementalDetokenizer:
    """One sequence: `push(new_tokens) -> new text`, then `flush()` at the end."""

    def __init__(self, decode: BatchDecode):
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix = 0
        """Start of the decode window (tokens before it are settled text)."""
        self.read = 0
        """Tokens up to here have been emitted as text."""

    def push(self, new_tokens: Sequence[int]) -> str:
        self.tokens.extend(int(t) for t in new_tokens)
        if len(self.tokens) == self.read:
            return ""
        window = self.tokens[self.prefix:]
        settled, text = self.decode([self.tokens[self.prefix:self.read], window])
        end = len(self.tokens)
        while text.endswith(REPLACEMENT) and end - 1 > self.read:  # hold back an incomplete character
            end -= 1
            text = self.decode([self.tokens[self.prefix:end]])[0]
        if text.endswith(REPLACEMENT) or len(text) <= len(settled):
            return ""
        self.prefix, self.read = self.read, end
        return text[len(settled):]

    def flush(self) -> str:
        """The held-back tail, as the tokenizer decodes it (an incomplete character becomes U+FFFD)."""
        if len(self.tokens) == self.read:
            return ""
        settled, text = self.decode([self.tokens[self.prefix:self.read], self.tokens[self.prefix:]])
        self.prefix = self.read = len(self.tokens)
        return text[len(settled):]


class StreamDetokenizers:
    """Incremental detokenizers keyed by stream (request id, batch row, beam), for the postprocessing model.

    The ensemble sends each streamed response of tensorrt_llm to postprocessing as a separate request that
    carries the client's request id; a response without an id is decoded on its own. Nothing marks the end
    of a stream, so idle streams expire after `ttl_s` and at most `max_streams` are kept.
    """

    def __init__(self, decode: BatchDecode, ttl_s: float = 30.0, max_streams: int = 4096):
        self.decode, self.ttl_s, self.max_streams = decode, ttl_s, max_streams
        self._streams: OrderedDict[str, tuple[IncrementalDetokenizer, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def text(self, key: str, tokens: Sequence[int]) -> str:
        if not key:
            return self.decode([list(tokens)])[0]
        now = time.monotonic()
        self._expire(now)
        entry = self._streams.pop(key, None)
        det = entry[0] if entry else IncrementalDetokenizer(self.decode)
        delta = det.push(tokens)
        self._streams[key] = (det, now)
        return delta

    def _expire(self, now: float) -> None:
        while self._streams:
            key, (_, last) = next(iter(self._streams.items()))
            if now - last <= self.ttl_s and len(self._streams) < self.max_streams:
                break
            del self._streams[key]
