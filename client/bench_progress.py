"""A rich progress bar for the benchmark (one task per load point), or nothing when disabled."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _Bar:
    def __init__(self, progress):
        self._progress = progress

    def task(self, description: str, total: int) -> Callable[..., None] | None:
        """A callback that advances a new task by one, or by its argument (None when the bar is off)."""
        if self._progress is None:
            return None
        tid = self._progress.add_task(description, total=total)
        return lambda n=1: self._progress.advance(tid, n)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as progress:
        yield _Bar(progress)
