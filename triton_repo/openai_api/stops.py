"""Stop strings on streamed text: the text before the first stop, never a stop's beginning sent too early.

The server also gets the stop strings as token ids, which ends generation at once when the model emits
exactly those tokens; this check covers stops the tokens spell differently, and removes the stop itself
from the output (as OpenAI does).
"""

from __future__ import annotations


class StopText:
    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        """Text held back: it ends in the beginning of a stop string."""
        self.matched: str | None = None

    def push(self, delta: str) -> str:
        """New text -> the part that can be sent now (the text before a match once one is found)."""
        if self.matched is not None or not delta:
            return ""
        text = self.pending + delta
        if not self.stops:
            self.pending = ""
            return text
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self.pending = ""
            return text[:at]
        keep = self._partial(text)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text once the output has ended without a match."""
        out, self.pending = self.pending, ""
        return out

    def _partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins a stop string."""
        for k in range(min(len(text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
