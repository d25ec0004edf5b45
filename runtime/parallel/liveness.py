"""Liveness of the ranks of a multi-rank reference runtime, busy or idle for any length of time.

Rank 0 speaks on the control channel at least every `heartbeat_s` (a step, or a heartbeat while idle), so a
rank waiting there for its next step never runs into the channel's timeout: that timeout (`timeout_s`) only
fires when rank 0 is gone or hung. The other way round, every rank adds 1 to its counter in rank 0's TCP store
every `heartbeat_s` from a thread of its own; rank 0 takes a rank whose counter has not moved for `timeout_s`
for hung or gone, and a rank process of its own node for dead as soon as it exits.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

import torch.distributed as dist

log = logging.getLogger(__name__)
HEARTBEAT_ENV, TIMEOUT_ENV = "ENGINESMITH_RANK_HEARTBEAT_S", "ENGINESMITH_RANK_TIMEOUT_S"
HEARTBEAT = "heartbeat"
"""The control message rank 0 broadcasts while idle."""


@dataclass(frozen=True)
class Liveness:
    heartbeat_s: float = 5.0
    timeout_s: float = 20.0
    """A rank silent this long is taken for hung or gone: noticed within timeout_s + heartbeat_s."""

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s <= self.timeout_s / 2:
            raise ValueError(f"rank heartbeat every {self.heartbeat_s} s with a {self.timeout_s} s timeout: "
                             f"give a heartbeat > 0 and a timeout of at least twice it "
                             f"({HEARTBEAT_ENV}, {TIMEOUT_ENV})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Liveness:
        """Defaults, overridden by ENGINESMITH_RANK_HEARTBEAT_S / ENGINESMITH_RANK_TIMEOUT_S (seconds)."""
        values = {}
        for field, name in (("heartbeat_s", HEARTBEAT_ENV), ("timeout_s", TIMEOUT_ENV)):
            if env.get(name):
                try:
                    values[field] = float(env[name])
                except ValueError:
                    raise ValueError(f"{name}={env[name]!r} is not a number of seconds") from None
        return cls(**values)


def alive_key(rank: int) -> str:
    return f"enginesmith/alive/{rank}"


def store_client(init_method: str, timeout_s: float) -> dist.TCPStore:
    """A connection of its own to the TCP store rank 0 serves at `init_method` (tcp://HOST:PORT)."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"init method {init_method!r}: give tcp://HOST:PORT of rank 0")
    return dist.TCPStore(url.hostname, url.port, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def exit_if_orphaned(parent_pid: int | None, who: str) -> None:
    """Exit at once (code 1, one log line) when `parent_pid` is no longer this process's parent: the process that
    spawned it is gone, and nothing would ever tell it to stop."""
    if parent_pid is not None and os.getppid() != parent_pid:
        log.error("%s: its parent process %d is gone; exiting", who, parent_pid)
        os._exit(1)


def watch_parent(parent_pid: int, who: str, period_s: float = 0.5) -> threading.Thread:
    """A daemon thread calling exit_if_orphaned every `period_s` (a process with no heartbeat loop of its own)."""
    def watch() -> None:
        while True:
            exit_if_orphaned(parent_pid, who)
            time.sleep(period_s)

    thread = threading.Thread(target=watch, name=f"{who}-parent-watch", daemon=True)
    thread.start()
    return thread


def start_heartbeat(rank: int, init_method: str, liveness: Liveness, parent_pid: int | None,
                    stopping: threading.Event) -> threading.Thread:
    """A rank > 0: bump this rank's counter every heartbeat_s. The process exits when rank 0's store stops
    answering, or when `parent_pid` (the process that spawned it, if any) is no longer its parent."""
    store = store_client(init_method, liveness.timeout_s)

    def beat() -> None:
        while not stopping.is_set():
            exit_if_orphaned(parent_pid, f"rank {rank}")
            try:
                store.add(alive_key(rank), 1)
            except Exception as e:  # noqa: BLE001 - whatever the store raises, rank 0 is unreachable
                if not stopping.is_set():
                    log.error("rank %d: rank 0 is unreachable (%s); exiting", rank, str(e).splitlines()[0])
                    os._exit(1)
            stopping.wait(liveness.heartbeat_s)

    thread = threading.Thread(target=beat, name=f"rank{rank}-heartbeat", daemon=True)
    thread.start()
    return thread


class RankMonitor:
    """Rank 0's view: the first rank found dead (its process exited) or silent for timeout_s."""

    def __init__(self, ranks: list[int], init_method: str, liveness: Liveness, processes: Mapping[int, object]):
        self.ranks, self.liveness, self.processes = ranks, liveness, processes
        self.store = store_client(init_method, liveness.timeout_s)
        now = time.monotonic()
        self._count = {r: -1 for r in ranks}
        self._moved = {r: now for r in ranks}
        self._next_read = now

    def dead_rank(self) -> tuple[int, str] | None:
        """(rank, a one-line reason naming it), or None while every rank is alive. Of several dead ranks,
        one that did not exit with code 1 (how a rank leaves when it loses a peer) is the likely cause."""
        dead = sorted((p.exitcode == 1, r) for r, p in self.processes.items() if not p.is_alive())
        if dead:
            r = dead[0][1]
            return r, f"rank {r} exited with code {self.processes[r].exitcode}"
        now = time.monotonic()
        if now < self._next_read:
            return None
        self._next_read = now + self.liveness.heartbeat_s / 2
        for r in self.ranks:
            count = int(self.store.add(alive_key(r), 0))
            if count != self._count[r]:
                self._count[r], self._moved[r] = count, now
            elif now - self._moved[r] > self.liveness.timeout_s:
                return r, f"rank {r} sent no heartbeat in {self.liveness.timeout_s:g} s (hung, or its node is gone)"
        return None
