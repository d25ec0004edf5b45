"""Rank processes of a multi-GPU (or multi-process CPU) reference runtime.

Rank 0 lives in the serving process and drives: each engine step it broadcasts a `StepMessage`
(the packed tokens of every micro-batch and the block tables they use) over a gloo control group;
every rank then runs its share through `runtime.pipeline.rank_forward` over its own KV cache, and
full logits come back to rank 0. Ranks of the first node are spawned here; ranks on other nodes
join the same rendezvous with `python -m runtime.workers --rank R --init-method tcp://HOST:PORT ...`.
"""

from __future__ import annotations

import argparse
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from builders.mapping import Mapping
from runtime.engine_config import EngineConfig
from runtime.fast_decode import FastDecoder, FastStep
from runtime.kv_cache import PagedKVCache
from runtime.model import RankModel
from runtime.paged_attention import PagedAttention, SeqSpan
from runtime.parallel import ParallelGroups, init_parallel
from runtime.pipeline import MicroBatch, rank_forward
from runtime.prefill_graphs import layer_runner

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


def _python_executable() -> str:
    """The interpreter for spawned ranks: inside Triton's Python stub sys.executable is the stub binary."""
    import os
    import sys

    exe = sys.executable or ""
    if os.path.basename(exe).startswith("python"):
        return exe
    return os.environ.get("ENGINESMITH_PYTHON") or os.path.join(sys.prefix, "bin", "python3")


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


def _serve_rank(groups: ParallelGroups, model: RankModel, cache: PagedKVCache,
                decoder: FastDecoder | None = None) -> None:
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=groups.control)
        msg: StepMessage | None = box[0]
        if msg is None:
            return
        cache.adopt_tables(msg.tables)
        if msg.fast is not None:
            if decoder is None:
                raise RuntimeError(f"rank {groups.rank} got a fast step but has no FastDecoder")
            decoder.run(msg.fast)
            continue
        rank_forward(model, groups, [mb.build(cache, model.device) for mb in msg.micro_batches],
                     layer_runner(model.device))


def worker_main(rank: int, ckpt_dir: str, mapping: Mapping, init_method: str, dtype: str, num_blocks: int,
                tokens_per_block: int, timeout_s: float = 30.0, engine_config: EngineConfig | None = None) -> None:
    """Body of one non-driver rank: join, load only this rank's file, serve steps until told to stop."""
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, mapping.world_size)))
    device = rank_device(mapping, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = init_parallel(mapping, rank, init_method, "nccl" if device.type == "cuda" else "gloo", timeout_s)
    model = RankModel.load(ckpt_dir, rank, device=device, dtype=dtype)
    cache = PagedKVCache(num_layers=model.num_local_layers, num_kv_heads=model.num_kv_heads,
                         head_size=model.head_size, num_blocks=num_blocks, tokens_per_block=tokens_per_block,
                         dtype=model.dtype, device=device)
    # the same fast path as rank 0's engine, set up at the same point (collective): see FastDecoder.for_engine
    decoder = FastDecoder.for_engine(model, cache, engine_config, groups) if engine_config is not None else None
    try:
        _serve_rank(groups, model, cache, decoder)
    finally:
        dist.destroy_process_group()


class RankWorkers:
    """Spawns ranks 1..N-1 of this node and drives them from rank 0 (the calling process)."""

    def __init__(self, ckpt_dir: str | Path, mapping: Mapping, dtype: str, num_blocks: int, tokens_per_block: int,
                 init_method: str, on_failure: Callable[[int, int | None], None] | None = None,
                 timeout_s: float = 30.0, engine_config: EngineConfig | None = None):
        """`engine_config`: the ranks build the engine's fast path (FastDecoder.for_engine) with its limits;
        rank 0's Engine must then build its own right after this returns."""
        import torch.multiprocessing as mp

        self.mapping, self.on_failure = mapping, on_failure
        ctx = mp.get_context("spawn")
        ctx.set_executable(_python_executable())
        local = [r for r in range(1, mapping.world_size) if mapping.rank_coords(r).node == 0]
        self.procs = {r: ctx.Process(target=worker_main, name=f"enginesmith-rank{r}", daemon=True,
                                     args=(r, str(ckpt_dir), mapping, init_method, dtype, num_blocks,
                                           tokens_per_block, timeout_s, engine_config)) for r in local}
        for p in self.procs.values():
            p.start()
        device = rank_device(mapping, 0)
        self.groups = init_parallel(mapping, 0, init_method, "nccl" if device.type == "cuda" else "gloo", timeout_s)
        self._closed = False
        self._watch = threading.Thread(target=self._watchdog, name="rank-watchdog", daemon=True)
        self._watch.start()

    def _watchdog(self) -> None:
        while not self._closed:
            for r, p in self.procs.items():
                if not p.is_alive() and not self._closed:
                    log.error("rank %d exited with code %s", r, p.exitcode)
                    self._closed = True
                    if self.on_failure is not None:
                        self.on_failure(r, p.exitcode)
                    return
            threading.Event().wait(0.5)

    @property
    def alive(self) -> bool:
        return not self._closed and all(p.is_alive() for p in self.procs.values())

    def forward(self, model: RankModel, cache: PagedKVCache, step: MicroBatchSpec, micro_batches: int) -> torch.Tensor:
        """Run one engine step on every rank; (rows, V) float32 logits on rank 0."""
        if not self.alive:
            raise RuntimeError("a rank of the runtime has died; the server must restart")
        mbs = split_micro_batches(step, micro_batches)
        tables = {s[0]: cache.block_table(s[0]) for s in step.spans}
        dist.broadcast_object_list([StepMessage(mbs, tables)], src=0, group=self.groups.control)
        logits = rank_forward(model, self.groups, [mb.build(cache, model.device) for mb in mbs],
                              layer_runner(model.device))
        return torch.cat(logits) if logits else torch.empty(0, model.cfg.vocab_size)

    def forward_fast(self, decoder: FastDecoder, cache: PagedKVCache, step: FastStep) -> torch.Tensor:
        """Run one single-stage step through every rank's FastDecoder; (rows, V) float32 logits on rank 0."""
        if not self.alive:
            raise RuntimeError("a rank of the runtime has died; the server must restart")
        tables = {s: cache.block_table(s) for s in step.seq_ids_all}
        dist.broadcast_object_list([StepMessage([], tables, step)], src=0, group=self.groups.control)
        return decoder.run(step)

    def close(self, timeout: float = 10.0) -> None:
        if not self._closed and self.alive:
            try:
                dist.broadcast_object_list([None], src=0, group=self.groups.control)
            except Exception:  # a dead rank: the processes are terminated below
                log.exception("could not tell the ranks to stop")
        self._closed = True
        for p in self.procs.values():
            p.join(timeout)
            if p.is_alive():
                p.terminate()
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
    from runtime.checkpoint import CheckpointConfig

    mapping = CheckpointConfig.from_dir(a.checkpoint).mapping
    worker_main(a.rank, a.checkpoint, mapping, a.init_method, a.dtype, a.num_blocks, a.tokens_per_block)


if __name__ == "__main__":
    main()
