"""Incremental detokenization, and the ledger that tells the ensemble's postprocessing which stream a chunk is.

Decoding each streamed chunk on its own (upstream's postprocessing) loses the leading space of
SentencePiece pieces and splits multi-byte UTF-8 characters whose bytes span two chunks. Instead we keep
the sequence and decode a small window with and without the new tokens (text-generation-inference's
prefix/read offsets), and hold back a tail that ends in an incomplete character (decoded as U+FFFD), at
most `MAX_HELD_TOKENS` tokens: a longer run of U+FFFD can never complete and is emitted. Joining the deltas
gives exactly `decode(all tokens)` (save a trailing incomplete character, which `flush` returns). `decode`
is any batch decoder, so the BLS can use the postprocessing model through BLS calls.

In the ensemble, every streamed tensorrt_llm response reaches postprocessing as a request of its own that
carries only the client's request id (which clients may share: upstream's send "" or a constant) and the
new tokens; Triton 2.51 passes nothing else between the steps. So the reference tensorrt_llm model writes
each streamed chunk into the stream ledger (`LedgerWriter`: SQLite in /dev/shm, one per server process) under
a stream id of its own; postprocessing (`LedgerReader`) finds the chunk it was given there (same request id,
same tokens, the oldest not sent before a chunk already taken: the ensemble delivers them in sending order),
keeps the stream's detokenizer state in it, and flushes and drops it at the stream's final chunk. Triton
does not cancel an ensemble's in-flight tensorrt_llm request when the client goes away (it only cancels
later steps, which never reach postprocessing); the ledger lets tensorrt_llm see that postprocessing stopped
taking a stream's chunks (`LedgerWriter.gone`) and stop it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPLACEMENT = "\ufffd"
MAX_HELD_TOKENS = 3
"""An incomplete UTF-8 character has at most 3 bytes, so it spans at most the last 3 tokens."""
BatchDecode = Callable[[list[list[int]]], list[str]]


class IncrementalDetokenizer:
    """One sequence: `push(new_tokens) -> new text`, then `flush()` at the end."""

    def __init__(self, decode: BatchDecode, tokens: Sequence[int] = (), read: int = 0):
        self.decode = decode
        self.tokens: list[int] = [int(t) for t in tokens]
        self.prefix = 0
        """Start of the decode window (tokens before it are settled text)."""
        self.read = read
        """Tokens up to here have been emitted as text."""

    def state(self) -> tuple[list[int], int]:
        """(the decode window, its emitted length): all `IncrementalDetokenizer(decode, *state)` needs."""
        return self.tokens[self.prefix:], self.read - self.prefix

    def push(self, new_tokens: Sequence[int]) -> str:
        self.tokens.extend(int(t) for t in new_tokens)
        if len(self.tokens) == self.read:
            return ""
        settled, text = self.decode([self.tokens[self.prefix:self.read], self.tokens[self.prefix:]])
        total = end = len(self.tokens)
        while text.endswith(REPLACEMENT) and end > self.read + 1 and end > total - MAX_HELD_TOKENS:
            end -= 1  # hold back what may be the start of a character
            text = self.decode([self.tokens[self.prefix:end]])[0]
        if text.endswith(REPLACEMENT) and end > total - MAX_HELD_TOKENS:
            return ""  # the new tokens may still complete a character
        if len(text) <= len(settled):
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


# ---- the ensemble's stream ledger ---------------------------------------------------------------------
WHOLE = "detokenize_whole"
"""Request parameter of postprocessing (the BLS sets it): decode the tokens on their own, never as a chunk."""
GRACE_S = 0.25
"""A chunk postprocessing has not taken this long after it was sent, although postprocessing took a later
chunk or sat idle, belongs to an ensemble request that is gone. A chunk reaches an idle postprocessing in
about a millisecond (11 ms at most measured on 2 CPU cores running 10 busy processes)."""
SEVERAL_GRACE_S = 2.0
"""GRACE_S when several postprocessing instances take chunks (a later one may be taken first meanwhile)."""
UNCLAIMED_S = 5.0
"""A stream none of whose chunks postprocessing took within this long is no ensemble's: it is not recorded."""
KEEP_S = 60.0
"""Chunks nobody took (a finished or cancelled stream's) are dropped this long after the stream's end."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stream(id TEXT PRIMARY KEY, key TEXT NOT NULL, first_ns INTEGER NOT NULL,
    taken INTEGER NOT NULL DEFAULT -1, end_ns INTEGER NOT NULL DEFAULT 0,
    window TEXT NOT NULL DEFAULT '[]', read INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS chunk(stream TEXT NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL,
    tokens TEXT NOT NULL, final INTEGER NOT NULL, sent_ns INTEGER NOT NULL, PRIMARY KEY(stream, seq));
CREATE INDEX IF NOT EXISTS chunk_by_key ON chunk(key, tokens);
CREATE TABLE IF NOT EXISTS reader(id INTEGER PRIMARY KEY CHECK (id = 0), frontier_ns INTEGER NOT NULL,
    busy INTEGER NOT NULL, idle_ns INTEGER NOT NULL, ordered INTEGER NOT NULL);
INSERT OR IGNORE INTO reader VALUES (0, 0, 0, 0, 0);
"""


def stream_key(request_id: str, correlation_id: object) -> str:
    """What the ensemble copies from the client's request to every step: request id and correlation id."""
    return f"{request_id}\x00{correlation_id}"


_PREFIX = "enginesmith-streams-"


def server_ledger_path(server_pid: int | None = None) -> Path:
    """The ledger of tritonserver `server_pid`; by default the one that started this Python-backend stub (the
    stubs' parent process)."""
    pid = os.getppid() if server_pid is None else server_pid
    return _ledger_dir() / f"{_PREFIX}{os.getuid()}-{pid}-{_start_time(pid)}.sqlite"


def _ledger_dir() -> Path:
    return Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())


def _start_time(pid: int) -> str:
    """A process's start time (clock ticks after boot): with the pid, it names one server's lifetime."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _remove_stale_ledgers() -> None:
    """Ledgers of servers that are gone without removing theirs (killed): their pid runs no longer, or again."""
    for path in _ledger_dir().glob(f"{_PREFIX}{os.getuid()}-*.sqlite"):
        pid, start = path.stem.removeprefix(f"{_PREFIX}{os.getuid()}-").partition("-")[::2]
        if pid.isdigit() and (not Path(f"/proc/{pid}").exists() or _start_time(int(pid)) != start):
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA journal_size_limit=262144")  # in RAM: the write-ahead log shrinks after checkpoints
    return conn


def _tokens(tokens: Sequence[int]) -> str:
    return ",".join(str(int(t)) for t in tokens)


@dataclass
class _Written:
    first_ns: int
    next_seq: int = 0
    claimed: bool | None = None
    """True once postprocessing took a chunk; False: not an ensemble's (nothing recorded); None: not known yet."""


class LedgerWriter:
    """The tensorrt_llm side: records streamed chunks and tells which streams' ensemble requests are gone."""

    def __init__(self, path: str | Path, clock: Callable[[], int] = time.monotonic_ns):
        self.path, self.clock = Path(path), clock
        _remove_stale_ledgers()
        if not self.path.exists():  # built aside, then renamed: a reader never opens a half-made file
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            conn = _connect(tmp)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.close()
            tmp.replace(self.path)
        self.conn = _connect(self.path)
        self.conn.executescript(_SCHEMA)
        self.lock = threading.Lock()
        self.streams: dict[str, _Written] = {}
        self._swept_ns = 0

    def sent(self, stream: str, key: str, tokens: Sequence[int], final: bool) -> None:
        """A chunk of `stream` (request `key`) is about to be sent."""
        self.sent_many([(stream, key, tokens, final)])

    def sent_many(self, chunks: Sequence[tuple[str, str, Sequence[int], bool]]) -> None:
        """Chunks (stream, request key, tokens, final) about to be sent, recorded in one transaction (a
        transaction per chunk cost ~30 us each: a 256-row step's responses waited ~8 ms for the ledger)."""
        now = self.clock()
        streams, rows, ends = [], [], []
        for stream, key, tokens, final in chunks:
            w = self.streams.setdefault(stream, _Written(first_ns=now))
            if final:
                self.streams.pop(stream, None)
            if w.claimed is None and now - w.first_ns > UNCLAIMED_S * 1e9:
                self._check_claimed(stream, w)
            if w.claimed is False:
                continue
            if w.next_seq == 0:
                streams.append((stream, key, now))
            rows.append((stream, w.next_seq, key, _tokens(tokens), int(final), now))
            if final:
                ends.append((now, stream))
            w.next_seq += 1
        if rows:
            with self.lock:
                self.conn.execute("BEGIN")
                try:
                    self.conn.executemany("INSERT OR IGNORE INTO stream(id, key, first_ns) VALUES (?, ?, ?)",
                                          streams)
                    self.conn.executemany("INSERT INTO chunk VALUES (?, ?, ?, ?, ?, ?)", rows)
                    self.conn.executemany("UPDATE stream SET end_ns = ? WHERE id = ?", ends)
                    self.conn.execute("COMMIT")
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
        if now - self._swept_ns > 10e9:
            self.sweep(now)

    def ended(self, stream: str) -> None:
        """`stream` ended without a final chunk (it failed): its records go with a later sweep."""
        w = self.streams.pop(stream, None)
        if w is not None and w.next_seq and w.claimed is not False:
            with self.lock:
                self.conn.execute("UPDATE stream SET end_ns = ? WHERE id = ?", (self.clock(), stream))

    def gone(self, stream: str) -> bool:
        """True when postprocessing took chunks of `stream` but stopped: its ensemble request is gone."""
        w = self.streams.get(stream)
        if w is None or w.claimed is False:
            return False
        now = self.clock()
        if w.claimed is None:
            self._check_claimed(stream, w)
            if not w.claimed:
                return False
        with self.lock:
            (oldest,) = self.conn.execute("SELECT MIN(sent_ns) FROM chunk WHERE stream = ?", (stream,)).fetchone()
            frontier, busy, idle, ordered = self.conn.execute(
                "SELECT frontier_ns, busy, idle_ns, ordered FROM reader").fetchone()
        grace = GRACE_S * 1e9
        if oldest is None or now - oldest < grace:
            return False
        # The ensemble hands postprocessing its chunks in the order they were sent: a later chunk taken (by the
        # one instance; several may take them out of order for a while), or an idle postprocessing, means this
        # one never reached it.
        passed = frontier > oldest and now - oldest >= (SEVERAL_GRACE_S * 1e9 if ordered else grace)
        return passed or (busy <= 0 and now - max(idle, oldest) >= grace)

    def _check_claimed(self, stream: str, w: _Written) -> None:
        with self.lock:
            row = self.conn.execute("SELECT taken FROM stream WHERE id = ?", (stream,)).fetchone()
            if row is not None and row[0] >= 0:
                w.claimed = True
            elif self.clock() - w.first_ns > UNCLAIMED_S * 1e9:
                w.claimed = False  # a client of tensorrt_llm itself, or the BLS: stop recording it
                self.conn.execute("DELETE FROM chunk WHERE stream = ?", (stream,))
                self.conn.execute("DELETE FROM stream WHERE id = ?", (stream,))

    def sweep(self, now: int | None = None) -> None:
        """Drop what no postprocessing will take: streams that ended more than KEEP_S ago."""
        now = self.clock() if now is None else now
        self._swept_ns = now
        cutoff = now - int(KEEP_S * 1e9)
        with self.lock:
            self.conn.execute("DELETE FROM chunk WHERE stream IN "
                              "(SELECT id FROM stream WHERE end_ns > 0 AND end_ns < ?)", (cutoff,))
            self.conn.execute("DELETE FROM stream WHERE end_ns > 0 AND end_ns < ?", (cutoff,))

    def close(self, remove: bool = True) -> None:
        with self.lock:
            self.conn.close()
        if remove:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)


class LedgerReader:
    """The postprocessing side: the text of a streamed chunk, with its stream's detokenizer state."""

    def __init__(self, path: str | Path, *, ordered: bool = False, clock: Callable[[], int] = time.monotonic_ns):
        self.conn = _connect(Path(path))
        self.ordered, self.clock = ordered, clock
        """ordered: several postprocessing instances; a stream's later chunk waits for its earlier one."""
        if ordered:
            self.conn.execute("UPDATE reader SET ordered = 1")

    @contextmanager
    def executing(self) -> Iterator[None]:
        """Mark postprocessing busy for the duration (an idle postprocessing proves a chunk never came).
        Advisory: a ledger error here leaves the count alone."""
        try:
            self.conn.execute("UPDATE reader SET busy = busy + 1")
        except sqlite3.Error:
            yield
            return
        try:
            yield
        finally:
            try:
                self.conn.execute("UPDATE reader SET busy = busy - 1, idle_ns = ?", (self.clock(),))
            except sqlite3.Error:
                pass

    def take(self, key: str, tokens: Sequence[int], decode: BatchDecode) -> str | None:
        """The text of the recorded chunk (`key`, `tokens`); None when no stream has sent such a chunk."""
        deadline = self.clock() + GRACE_S * 1e9
        while True:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                text = self._take(key, _tokens(tokens), tokens, decode, self.clock() > deadline)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            if text is not _WAIT:
                return text
            time.sleep(0.002)

    def _take(self, key: str, encoded: str, tokens: Sequence[int], decode: BatchDecode, late: bool):
        c = self.conn
        rows = c.execute("SELECT stream, seq, final, sent_ns FROM chunk WHERE key = ? AND tokens = ? "
                         "ORDER BY sent_ns", (key, encoded)).fetchall()
        if not rows:
            return None
        (frontier,) = c.execute("SELECT frontier_ns FROM reader").fetchone()
        # Chunks sent before one already taken are a gone request's: the ensemble delivers in sending order.
        stream, seq, final, sent_ns = next((r for r in rows if r[3] >= frontier), rows[0])
        if self.ordered and not late and c.execute(
                "SELECT 1 FROM chunk WHERE stream = ? AND seq < ? AND sent_ns > ?",
                (stream, seq, self.clock() - GRACE_S * 1e9)).fetchone():
            return _WAIT  # an earlier chunk of this stream is still with another instance
        row = c.execute("SELECT window, read FROM stream WHERE id = ?", (stream,)).fetchone()
        if row is None:
            return None
        det = IncrementalDetokenizer(decode, json.loads(row[0]), row[1])
        text = det.push(tokens) + (det.flush() if final else "")
        if final:
            c.execute("DELETE FROM chunk WHERE stream = ?", (stream,))
            c.execute("DELETE FROM stream WHERE id = ?", (stream,))
        else:
            window, read = det.state()
            c.execute("DELETE FROM chunk WHERE stream = ? AND seq <= ?", (stream, seq))
            c.execute("UPDATE stream SET taken = ?, window = ?, read = ? WHERE id = ?",
                      (seq, json.dumps(window), read, stream))
        c.execute("UPDATE reader SET frontier_ns = MAX(frontier_ns, ?)", (sent_ns,))
        return text

    def close(self) -> None:
        self.conn.close()


_WAIT = object()
