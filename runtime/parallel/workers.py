"""Rank processes of a multi-GPU (or multi-process CPU) reference runtime.

Rank 0 lives in the serving process and drives: each engine step it broadcasts a `StepMessage`
(the packed tokens of every micro-batch and the block tables they use) over a gloo control group;
every rank then runs its share through `runtime.parallel.pipeline.rank_forward` over its own KV cache, and
full logits come back to rank 0. While idle, rank 0 broadcasts heartbeats instead, and every rank
reports its own heartbeat to rank 0's store (`runtime.parallel.liveness`): idling never times out, and a dead or hung
rank is named within the liveness timeout. Ranks of the first node are spawned here; ranks on other nodes
join the same rendezvous with
`python -m enginesmith.runtime.parallel.workers --rank R --init-method tcp://HOST:PORT ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from enginesmith.builders.mapping import Mapping
from enginesmith.runtime.engine.engine_config import EngineConfig
from enginesmith.runtime.fast.fast_decode import FastDecoder, FastStep
from enginesmith.runtime.engine.kv_cache import PagedKVCache
from enginesmith.runtime.parallel.liveness import HEARTBEAT, Liveness, RankMonitor, start_heartbeat
from enginesmith.runtime.model.model import RankModel
from enginesmith.runtime.model.paged_attention import PagedAttention, SeqSpan
from enginesmith.runtime.parallel.groups import ParallelGroups, init_parallel
from enginesmith.runtime.parallel.pipeline import MicroBatch, rank_forward
from enginesmith.runtime.parallel.spawn import python_executable
from enginesmith.runtime.fast.prefill_graphs import layer_runner

log = logging.getLogger(__name__)


@dataclass
class MicroBatchSpec:
    """A micro-batch as plain lists, cheap to pickle to the other ranks."""

    input_ids: list[int]
    positions: list[int]
    spans: list[tuple[int, int, int]]  # (seq_id, start, num_tokens)
    logit_rows: list[int]

    def build(self, cache: PagedKVCache, device: torch.device) -> MicroBatch:
        spans = [SeqSpan(*s) for s in self.spans]
        return MicroBatch(
            input_ids=torch.tensor(self.input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(self.positions, dtype=torch.long, device=device),
            logit_rows=torch.tensor(self.logit_rows, dtype=torch.long, device=device),
            attn=PagedAttention(cache, spans))


@dataclass
class StepMessage:
    micro_batches: list[MicroBatchSpec]
    tables: dict[int, list[int]]
    fast: FastStep | None = None
    """A single-stage step through every rank's FastDecoder (then micro_batches is empty)."""


def split_micro_batches(spec: MicroBatchSpec, count: int) -> list[MicroBatchSpec]:
    """Split a step's sequences into up to `count` micro-batches of about equal token counts."""
    if count <= 1 or len(spec.spans) <= 1:
        return [spec]
    total = len(spec.input_ids)
    out, row, seq_rows = [], 0, []
    for seq_id, start, n in spec.spans:
        seq_rows.append((row, seq_id, start, n))
        row += n
    target, cur = total / min(count, len(spec.spans)), None
    wanted = set(spec.logit_rows)
    for row, seq_id, start, n in seq_rows:
        if cur is None or (len(cur.input_ids) >= target and len(out) < count - 1):
            cur = MicroBatchSpec([], [], [], [])
            out.append(cur)
        base = len(cur.input_ids)
        cur.input_ids += spec.input_ids[row:row + n]
        cur.positions += spec.positions[row:row + n]
        cur.spans.append((seq_id, start, n))
        cur.logit_rows += [base + (r - row) for r in range(row, row + n) if r in wanted]
    return out


def free_init_method(host: str = "127.0.0.1") -> str:
    """A tcp:// rendezvous on a free local port (single-node jobs)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def rank_device(mapping: Mapping, rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", mapping.rank_coords(rank).local_gpu % torch.cuda.device_count())
    return torch.device("cpu")


class ControlLost(RuntimeError):
    """The control channel from rank 0 failed: rank 0 (or a peer) is gone, or fell silent past the timeout."""


def _next_message(groups: ParallelGroups) -> object:
    box = [None]
    try:
        dist.broadcast_object_list(box, src=0, group=groups.control)
    except RuntimeError as e:
        raise ControlLost(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return box[0]


def _serve_rank(groups: ParallelGroups, model: RankModel, cache: PagedKVCache,
                decoder: FastDecoder | None = None) -> None:
    while True:
        msg = _next_message(groups)
        if msg is None:
            return
        if msg == HEARTBEAT:
            continue
        cache.adopt_tables(msg.tables)
        if msg.fast is not None:
            if decoder is None:
                raise RuntimeError(f"rank {groups.rank} got a fast step but has no FastDecoder")
            decoder.run(msg.fast)
            continue
        rank_forward(model, groups, [mb.build(cache, model.device) for mb in msg.micro_batches],
                     layer_runner(model.device))


def worker_main(rank: int, ckpt_dir: str, mapping: Mapping, init_method: str, dtype: str, num_blocks: int,
                tokens_per_block: int, liveness: Liveness | None = None, parent_pid: int | None = None,
                engine_config: EngineConfig | None = None) -> None:
    """Body of one non-driver rank: join, load only this rank's file, serve steps until told to stop.
    Exits (code 1, one log line) when rank 0 is gone, or when `parent_pid` is no longer its parent.
    `engine_config`: build the engine's fast path (FastDecoder.for_engine) as rank 0 does."""
    liveness = liveness or Liveness()
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, mapping.world_size)))
    device = rank_device(mapping, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = init_parallel(mapping, rank, init_method, "nccl" if device.type == "cuda" else "gloo",
                           control_timeout_s=liveness.timeout_s)
    stopping = threading.Event()
    start_heartbeat(rank, init_method, liveness, parent_pid, stopping)
    model = RankModel.load(ckpt_dir, rank, device=device, dtype=dtype)
    cache = PagedKVCache(num_layers=model.num_local_layers, num_kv_heads=model.num_kv_heads,
                         head_size=model.head_size, num_blocks=num_blocks, tokens_per_block=tokens_per_block,
                         dtype=model.dtype, device=device)
    # the same fast path as rank 0's engine, set up at the same point (collective): see FastDecoder.for_engine
    decoder = FastDecoder.for_engine(model, cache, engine_config, groups) if engine_config is not None else None
    try:
        _serve_rank(groups, model, cache, decoder)
    except ControlLost as e:
        log.error("rank %d: the control channel from rank 0 failed (%s); exiting", rank, e)
        raise SystemExit(1) from None
    finally:
        stopping.set()
        dist.destroy_process_group()


class RankWorkers:
    """Spawns ranks 1..N-1 of this node and drives them from rank 0 (the calling process).

    `on_failure(rank, reason)` is called once, from a watch thread, when a rank dies or falls silent."""

    def __init__(self, ckpt_dir: str | Path, mapping: Mapping, dtype: str, num_blocks: int, tokens_per_block: int,
                 init_method: str, on_failure: Callable[[int, str], None] | None = None,
                 liveness: Liveness | None = None, engine_config: EngineConfig | None = None):
        """`engine_config`: the ranks build the engine's fast path (FastDecoder.for_engine) with its limits;
        rank 0's Engine must then build its own right after this returns."""
        import torch.multiprocessing as mp

        self.mapping, self.on_failure = mapping, on_failure
        self.liveness = liveness or Liveness.from_env()
        ctx = mp.get_context("spawn")
        ctx.set_executable(python_executable())
        local = [r for r in range(1, mapping.world_size) if mapping.rank_coords(r).node == 0]
        self.procs = {r: ctx.Process(target=worker_main, name=f"enginesmith-rank{r}", daemon=True,
                                     args=(r, str(ckpt_dir), mapping, init_method, dtype, num_blocks,
                                           tokens_per_block, self.liveness, os.getpid(), engine_config))
                      for r in local}
        for p in self.procs.values():
            p.start()
        device = rank_device(mapping, 0)
        self.groups = init_parallel(mapping, 0, init_method, "nccl" if device.type == "cuda" else "gloo",
                                    control_timeout_s=self.liveness.timeout_s)
        self.monitor = RankMonitor(list(range(1, mapping.world_size)), init_method, self.liveness, self.procs)
        self._closed = False
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._threads = [threading.Thread(target=self._watch, name="rank-watchdog", daemon=True),
                         threading.Thread(target=self._heartbeats, name="rank-heartbeats", daemon=True)]
        for t in self._threads:
            t.start()

    def _watch(self) -> None:
        while not self._stop.wait(min(0.5, self.liveness.heartbeat_s / 2)):
            try:
                found = self.monitor.dead_rank()
            except Exception:  # noqa: BLE001 - the store lives in this process; keep watching
                log.exception("rank watchdog: reading the ranks' heartbeats failed")
                continue
            if found is None or self._closed or self._stop.is_set():  # set first by close(): no failure
                continue
            rank, reason = found
            log.error(reason)
            self._closed = True
            self._stop.set()
            if self.on_failure is not None:
                self.on_failure(rank, reason)
            return

    def _heartbeats(self) -> None:
        """Rank 0 speaks at least every heartbeat_s, so an idle rank's wait never times out."""
        period = self.liveness.heartbeat_s
        while not self._stop.wait(period / 4):
            if self._closed or time.monotonic() - self._last_sent < period:
                continue
            try:
                self._broadcast(HEARTBEAT)
            except Exception as e:  # noqa: BLE001 - a gloo error: the watchdog names the rank
                log.error("rank heartbeats stopped: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
                return

    def _broadcast(self, message: object) -> None:
        with self._send_lock:
            if message == HEARTBEAT and self._stop.is_set():
                return
            if self._closed and message is not None:
                raise RuntimeError("a rank of the runtime has died; the server must restart")
            dist.broadcast_object_list([message], src=0, group=self.groups.control)
            self._last_sent = time.monotonic()

    @property
    def alive(self) -> bool:
        return not self._closed and all(p.is_alive() for p in self.procs.values())

    def forward(self, model: RankModel, cache: PagedKVCache, step: MicroBatchSpec, micro_batches: int) -> torch.Tensor:
        """Run one engine step on every rank; (rows, V) float32 logits on rank 0."""
        if not self.alive:
            raise RuntimeError("a rank of the runtime has died; the server must restart")
        mbs = split_micro_batches(step, micro_batches)
        tables = {s[0]: cache.block_table(s[0]) for s in step.spans}
        self._broadcast(StepMessage(mbs, tables))
        logits = rank_forward(model, self.groups, [mb.build(cache, model.device) for mb in mbs],
                              layer_runner(model.device))
        return torch.cat(logits) if logits else torch.empty(0, model.cfg.vocab_size)

    def forward_fast(self, decoder: FastDecoder, cache: PagedKVCache, step: FastStep) -> torch.Tensor:
        """Run one single-stage step through every rank's FastDecoder; (rows, V) float32 logits on rank 0."""
        if not self.alive:
            raise RuntimeError("a rank of the runtime has died; the server must restart")
        tables = {s: cache.block_table(s) for s in step.seq_ids_all}
        self._broadcast(StepMessage([], tables, step))
        return decoder.run(step)

    def close(self, timeout: float = 10.0) -> None:
        """Tell the ranks to stop and wait for them; after a failure, terminate the rest at once."""
        told, alive = False, self.alive
        self._stop.set()  # before the ranks exit: the watchdog must not take that for a failure
        if alive:
            try:
                self._broadcast(None)
                told = True
            except Exception:  # a dead rank: the processes are terminated below
                log.exception("could not tell the ranks to stop")
        self._closed = True
        for p in self.procs.values():
            p.join(timeout if told else 0)
            if p.is_alive():
                p.terminate()
                p.join(timeout)
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description="Join a multi-node reference runtime as one rank.")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--init-method", required=True, help="tcp://HOST:PORT of rank 0")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-blocks", type=int, required=True)
    ap.add_argument("--tokens-per-block", type=int, default=32)
    a = ap.parse_args()
    from enginesmith.runtime.model.checkpoint import CheckpointConfig

    mapping = CheckpointConfig.from_dir(a.checkpoint).mapping
    try:
        liveness = Liveness.from_env()  # must match rank 0's: ENGINESMITH_RANK_HEARTBEAT_S / _TIMEOUT_S
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    worker_main(a.rank, a.checkpoint, mapping, a.init_method, a.dtype, a.num_blocks, a.tokens_per_block, liveness)


if __name__ == "__main__":
    main()
