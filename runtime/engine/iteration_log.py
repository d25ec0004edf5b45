"""Per-iteration statistics of the reference engine, kept in memory and optionally appended to a JSONL file."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class IterationStats:
    iteration: int
    start_ns: int
    """time.monotonic_ns() when the iteration began (the clock of the request timing outputs)."""
    duration_ns: int
    batch_size: int
    """Requests that ran in this iteration (context + generation)."""
    num_context: int
    num_generation: int
    num_tokens: int
    num_context_tokens: int
    kv_used_blocks: int
    """After this iteration's finished requests gave their blocks back."""
    kv_free_blocks: int
    active: int
    queued: int
    paused: int
    """Requests evicted by max_utilization in this iteration."""
    released: int
    """Requests that finished, were cancelled or failed in this iteration."""
    kv_reused_blocks: int = 0
    """Prompt blocks taken from the prefix cache so far (all iterations; KV-cache reuse only)."""
    kv_missed_blocks: int = 0
    """Prompt blocks that had to be computed so far (all iterations; KV-cache reuse only)."""


class IterationLog:
    """The last `maxlen` iterations in memory; every one also written to `path` when given."""

    def __init__(self, path: str | Path | None = None, maxlen: int = 100_000):
        self.recent: deque[IterationStats] = deque(maxlen=maxlen)
        self._file = open(path, "a") if path else None

    def append(self, stats: IterationStats) -> None:
        self.recent.append(stats)
        if self._file:
            self._file.write(json.dumps(asdict(stats)) + "\n")
            self._file.flush()

    def __iter__(self):
        return iter(list(self.recent))

    def __len__(self) -> int:
        return len(self.recent)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def read_iteration_log(path: str | Path) -> list[IterationStats]:
    """Parse a JSONL iteration log written by IterationLog (a line still being written is left out)."""
    complete = Path(path).read_text().split("\n")[:-1]
    return [IterationStats(**json.loads(line)) for line in complete if line.strip()]
