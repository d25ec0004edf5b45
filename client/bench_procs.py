"""Load points driven by several client processes (`BenchConfig.client_procs`, `bench --client-procs N`).

One asyncio process spends ~0.1-0.2 ms of CPU per streamed response, so at thousands of responses a second
it measures itself rather than the server. With N > 1 each load point is split over N worker processes
(spawned: a forked gRPC or asyncio process is unsafe), each with its own event loop and client:
- closed loop at concurrency c: worker i keeps c_i in flight (c split as evenly as possible) over a share of
  the prompts in proportion to c_i;
- Poisson rate r: each worker issues at r / N (the superposition is Poisson at r; `inf` sends all at once),
  a max_concurrency cap split like c.
A point that cannot give every worker a request in flight (its concurrency, cap or prompt count below N)
runs on fewer and says so (`client_procs_note`); on one, the bench process drives it itself.
The workers start once per run and set up their clients; for each point they take their share, report ready,
and drive from one origin the parent sends (time.monotonic(): CLOCK_MONOTONIC is system-wide on Linux), so
`duration_s` counts from the same instant in every worker. Their RequestRecords come back pickled; the
parent merges them in issue order. A worker that raises, dies or stalls fails the point with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from enginesmith.client.bench import BenchConfig, LoadPoint, open_runner
from enginesmith.client.dataset import Prompt
from enginesmith.client.params import ClientError
from enginesmith.client.record import RequestRecord

SETUP_TIMEOUT_S = 120.0
"""A worker's start: interpreter, imports, its client and the model's config."""
READY_TIMEOUT_S = 60.0
"""Taking a point's share of the prompts."""
STALL_GRACE_S = 60.0
"""Beyond the request timeout: no request completed for this long while a point runs means a worker hangs."""
POLL_S = 0.02


class ClientProcsError(ClientError):
    """A client worker process failed, died or hung: the point cannot be measured."""


@dataclass(frozen=True)
class Share:
    """One worker's part of a load point: its own load and the prompts[start:stop] it sends."""

    point: LoadPoint
    start: int
    stop: int


@dataclass
class PointLoad:
    """What the workers measured for one point, merged."""

    records: list[RequestRecord]
    """In issue order."""
    sent: list[Prompt]
    """The prompt of each record."""
    origin_ns: int
    end_ns: int
    """When the last worker finished driving."""
    cpu_s: list[float]
    """Each worker's CPU seconds while it drove."""
    requests: list[int]
    """Requests each worker issued."""


def split_even(total: int, parts: int) -> list[int]:
    """`total` in `parts` integers that differ by at most one, larger first."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


def split_weighted(total: int, weights: Sequence[int]) -> list[int]:
    """`total` in proportion to `weights` (largest remainders round up); none is 0 while total >= len(weights)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0 and total >= len(counts):
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return counts


def plan_shares(point: LoadPoint, num_prompts: int, procs: int) -> tuple[list[Share], str | None]:
    """The workers' shares of a point, and a note when fewer than `procs` can each have a request in flight."""
    closed = point.mode == "concurrency"
    limit = int(point.value) if closed else (point.max_concurrency or None)
    n = max(1, min(procs, num_prompts, limit or procs))
    note = None
    if n < procs:
        what = (f"{num_prompts} prompts" if limit is None or num_prompts < limit
                else f"concurrency {limit}" if closed else f"max_concurrency {limit}")
        note = f"{what} for {procs} client processes: ran on {n}"
    if closed:
        slots = split_even(int(point.value), n)
        counts = split_weighted(num_prompts, slots)
        loads = [LoadPoint("concurrency", c) for c in slots]
    else:
        caps = split_even(limit, n) if limit else [None] * n
        counts = split_even(num_prompts, n)
        loads = [LoadPoint("rate", point.value / n, cap) for cap in caps]
    bounds = list(itertools.accumulate(counts, initial=0))
    return [Share(p, a, b) for p, a, b in zip(loads, bounds, bounds[1:], strict=False)], note


def worker_seed(seed: int, index: int) -> int:
    """Each worker's Poisson schedule gets its own stream of the run's seed."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def worker_main(index: int, cfg: BenchConfig, tokenizer: Any, conn: Any, done: Any) -> None:
    """A client worker process: open a runner, then drive each share the parent sends from its origin."""
    try:
        asyncio.run(_work(index, cfg, tokenizer, conn, done))
    except (EOFError, KeyboardInterrupt):  # the parent went away, or the run was interrupted
        pass
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the point with it
        with contextlib.suppress(OSError):
            conn.send(("error", _one_line(e)))


async def _work(index: int, cfg: BenchConfig, tokenizer: Any, conn: Any, done: Any) -> None:
    async with open_runner(cfg, tokenizer) as runner:
        def count() -> None:
            done[index] += 1

        runner.on_done = count
        conn.send(("up",))
        while True:  # between points the worker idles in recv: nothing of its own runs then
            msg = conn.recv()
            if msg[0] == "stop":
                return
            _, point, prompts, duration_s = msg
            conn.send(("ready",))
            _, origin = conn.recv()
            cpu0 = time.process_time()
            records = await runner.drive(prompts, point, duration_s, origin=origin)
            end_ns, cpu = time.monotonic_ns(), time.process_time() - cpu0
            conn.send(("done", records, cpu, end_ns))


@dataclass
class _Worker:
    index: int
    proc: Any
    conn: Any

    def fate(self) -> str:
        self.proc.join(1.0)
        code = self.proc.exitcode
        if code is None:
            return "closed its pipe"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def name(self) -> str:
        return f"client worker {self.index} (pid {self.proc.pid})"


class ClientProcs:
    """`count` spawned client workers for a run's points (start, wait_up, run_point..., close)."""

    def __init__(self, cfg: BenchConfig, tokenizer: Any, count: int):
        self.cfg = cfg
        ctx = mp.get_context("spawn")
        self.done = ctx.RawArray("q", count)
        """Requests each worker completed so far (each writes its own slot): the progress bar's source."""
        self.workers: list[_Worker] = []
        self._child_ends = []
        for i in range(count):
            ours, theirs = ctx.Pipe()
            wcfg = replace(cfg, seed=worker_seed(cfg.seed, i), client_procs=1)
            if cfg.backend == "openai":
                wcfg = replace(wcfg, grpc_url="")  # Triton's statistics are the parent's to read
            proc = ctx.Process(target=worker_main, args=(i, wcfg, tokenizer, theirs, self.done),
                               name=f"enginesmith-bench-client-{i}", daemon=True)
            self.workers.append(_Worker(i, proc, ours))
            self._child_ends.append(theirs)

    def start(self) -> None:
        for w in self.workers:
            w.proc.start()
        for end in self._child_ends:  # the parent keeps none: a dead worker's pipe reads as EOF
            end.close()

    async def wait_up(self) -> None:
        """Every worker's client is set up (before any point's clock starts)."""
        await self._collect(self.workers, "up", SETUP_TIMEOUT_S, "while setting up its client")

    async def run_point(self, shares: list[Share], prompts: list[Prompt], duration_s: float | None, label: str,
                        on_start: Callable[[float], None], advance: Callable[[int], None] | None) -> PointLoad:
        """Hand each worker its share, start them all at one origin (on_start(origin) first), merge their
        records; `advance(n)` as they complete requests."""
        workers = self.workers[:len(shares)]
        for w, s in zip(workers, shares, strict=True):
            self._send(w, ("point", s.point, prompts[s.start:s.stop], duration_s), f"before point {label}")
        await self._collect(workers, "ready", READY_TIMEOUT_S, f"while taking its share of point {label}")
        origin_ns = time.monotonic_ns()
        on_start(origin_ns / 1e9)
        for w in workers:
            self._send(w, ("go", origin_ns / 1e9), f"at the start of point {label}")
        rate = shares[0].point.value if shares[0].point.mode == "rate" else math.inf
        stall_s = self.cfg.request_timeout_s + STALL_GRACE_S + (50.0 / rate if math.isfinite(rate) else 0.0)
        got = await self._collect(workers, "done", stall_s, f"while driving point {label}", advance)
        pairs = []
        for w, s in zip(workers, shares, strict=True):
            records = got[w.index][1]
            pairs += zip(records, prompts[s.start:s.start + len(records)], strict=True)
        pairs.sort(key=lambda rp: rp[0].issue_ns)
        return PointLoad(records=[r for r, _ in pairs], sent=[p for _, p in pairs], origin_ns=origin_ns,
                         end_ns=max(got[w.index][3] for w in workers), cpu_s=[got[w.index][2] for w in workers],
                         requests=[len(got[w.index][1]) for w in workers])

    def _send(self, w: _Worker, msg: tuple, when: str) -> None:
        try:
            w.conn.send(msg)
        except OSError:
            raise ClientProcsError(f"{w.name()} {w.fate()} {when}") from None

    async def _collect(self, workers: list[_Worker], kind: str, limit_s: float, doing: str,
                       advance: Callable[[int], None] | None = None) -> dict[int, tuple]:
        """Each worker's next message, which must be `kind`; fails on an error, a death, or `limit_s` without
        any message or completed request."""
        got: dict[int, tuple] = {}
        seen = sum(self.done)
        last = time.monotonic()
        while len(got) < len(workers):
            for w in workers:
                if w.index in got:
                    continue
                try:
                    msg = w.conn.recv() if w.conn.poll() else None
                except (EOFError, OSError):
                    raise ClientProcsError(f"{w.name()} {w.fate()} {doing}") from None
                if msg is None:
                    if not w.proc.is_alive():
                        raise ClientProcsError(f"{w.name()} {w.fate()} {doing}")
                    continue
                if msg[0] == "error":
                    raise ClientProcsError(f"{w.name()} failed {doing}: {msg[1]}")
                if msg[0] != kind:
                    raise ClientProcsError(f"{w.name()} sent {msg[0]!r} instead of {kind!r} {doing}")
                got[w.index] = msg
                last = time.monotonic()
            now_done = sum(self.done)
            if now_done != seen:
                if advance is not None:
                    advance(now_done - seen)
                seen, last = now_done, time.monotonic()
            if len(got) < len(workers):
                if time.monotonic() - last > limit_s:
                    idle = ", ".join(str(w.index) for w in workers if w.index not in got)
                    raise ClientProcsError(f"client worker(s) {idle}: nothing for {limit_s:.0f} s {doing} "
                                           f"(request timeout {self.cfg.request_timeout_s:g} s)")
                await asyncio.sleep(POLL_S)
        return got

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: asked to, then terminated; `graceful=False` terminates at once."""
        if graceful:
            for w in self.workers:
                with contextlib.suppress(OSError):
                    w.conn.send(("stop",))
        for w in self.workers:
            if w.proc.pid is not None:
                w.proc.join(5.0 if graceful else 0.0)
                if w.proc.is_alive():
                    w.proc.terminate()
                    w.proc.join(5.0)
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join()
            w.conn.close()


@contextlib.contextmanager
def client_procs(cfg: BenchConfig, tokenizer: Any, count: int) -> Iterator[ClientProcs | None]:
    """`count` started workers (None for one: the bench process drives alone); stopped on exit."""
    if count <= 1:
        yield None
        return
    procs = ClientProcs(cfg, tokenizer, count)
    ok = False
    try:
        procs.start()
        yield procs
        ok = True
    finally:
        procs.close(graceful=ok)
