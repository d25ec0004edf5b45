"""Bound the bytes that all worker threads hold at once (mapped source pages plus output pieces)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class MemoryGate:
    """Counting semaphore over bytes: `hold(n)` waits until n more bytes fit under `limit`.

    A request larger than the limit is clipped to it, so it runs alone instead of deadlocking. With the
    limit set to the largest single piece, peak memory is one constant plus the largest tensor whatever
    the number of workers, while small pieces of several ranks still proceed in parallel.
    """

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        n = min(max(0, nbytes), self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()
