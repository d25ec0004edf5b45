"""A rich byte-progress bar that worker threads can advance (or a no-op when disabled)."""

from __future__ import annotations


class ByteProgress:
    """Context manager: one bar of `total` bytes; `advance(n)` is thread-safe."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.description, self.enabled = total, description, enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> ByteProgress:
        if self.enabled and self.total:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn())
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
