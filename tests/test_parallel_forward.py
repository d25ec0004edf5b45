"""Real multi-process ranks (torch.distributed, gloo) reproduce the single-process oracle.

Each process loads only its own rank file; TP partials are all-reduced, PP stages exchange
activations point to point with several micro-batches in flight.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from enginesmith.builders.mapping import Mapping
from enginesmith.runtime.model.attention import DenseCausalAttention
from enginesmith.runtime.model.emulate import emulate_logits
from tests.support import convert_tiny

PROMPTS = [[5, 17, 33, 2, 99], [120, 7, 8, 250, 311, 42, 3], [9, 9, 1], [64, 65, 66, 67]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, ckpt: str, world: int, port: int, n_micro: int, queue) -> None:
    import torch.distributed as dist

    from enginesmith.runtime.model.checkpoint import CheckpointConfig
    from enginesmith.runtime.model.model import RankModel
    from enginesmith.runtime.parallel.groups import init_parallel
    from enginesmith.runtime.parallel.pipeline import MicroBatch, rank_forward

    torch.set_num_threads(1)
    cfg = CheckpointConfig.from_dir(ckpt)
    groups = init_parallel(cfg.mapping, rank, f"tcp://127.0.0.1:{port}", "gloo")
    model = RankModel.load(ckpt, rank, dtype=torch.float32)
    per = -(-len(PROMPTS) // n_micro)
    mbs = []
    for j in range(0, len(PROMPTS), per):
        seqs = PROMPTS[j:j + per]
        lens = [len(s) for s in seqs]
        mbs.append(MicroBatch(
            input_ids=torch.tensor([t for s in seqs for t in s]),
            positions=torch.cat([torch.arange(n) for n in lens]),
            logit_rows=torch.arange(sum(lens)),
            attn=DenseCausalAttention(lens)))
    logits = rank_forward(model, groups, mbs)
    if rank == 0:
        queue.put(torch.cat(logits).numpy())
    dist.destroy_process_group()


def _run_ranks(ckpt, world: int, n_micro: int):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, str(ckpt), world, port, n_micro, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    return torch.from_numpy(out)


@pytest.mark.parametrize("arch,tp,pp,ep,n_micro", [
    ("llama", 2, 1, None, 1),
    ("llama", 1, 2, None, 2),
    ("llama", 2, 2, None, 3),
    ("mixtral", 2, 1, 2, 1),
    ("mixtral", 2, 2, 1, 2),
])
def test_ranks_match_single_process_oracle(tmp_path, arch, tp, pp, ep, n_micro):
    mapping = Mapping.create(tp_size=tp, pp_size=pp, moe_ep_size=ep)
    ckpt = convert_tiny(tmp_path, arch, mapping)
    expected = emulate_logits(ckpt, PROMPTS)
    got = _run_ranks(ckpt, mapping.world_size, n_micro)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
