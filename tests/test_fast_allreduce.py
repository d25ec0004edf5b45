"""runtime/parallel/fast_allreduce.py off the GPU: it stays off with a reason and every all-reduce still sums (gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from enginesmith.builders.mapping import Mapping
from enginesmith.runtime.parallel.fast_allreduce import FastAllReduce
from enginesmith.runtime.parallel.groups import ParallelGroups


@pytest.fixture
def world():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_cpu_stays_off_with_the_reason_and_still_reduces(world, monkeypatch):
    monkeypatch.delenv("ENGINESMITH_FAST_ALLREDUCE", raising=False)
    ar = FastAllReduce(world, torch.device("cpu"), torch.float32, 8192)
    assert not ar.enabled and "needs CUDA" in ar.reason
    x = torch.arange(8, dtype=torch.float32)
    assert not ar.accepts(x)
    assert torch.equal(ar(x), torch.arange(8, dtype=torch.float32))  # world of 1: the sum is x
    assert ar.status()["calls"] == {"fast": 0, "nccl": 1}


def test_env_switch_turns_it_off_first(world, monkeypatch):
    monkeypatch.setenv("ENGINESMITH_FAST_ALLREDUCE", "0")
    ar = FastAllReduce(world, torch.device("cpu"), torch.bfloat16, 8192)
    assert not ar.enabled and ar.reason == "disabled by ENGINESMITH_FAST_ALLREDUCE=0"


def test_parallel_groups_keep_the_plain_path_on_cpu(world):
    groups = ParallelGroups(Mapping.create(tp_size=2), Mapping.create(tp_size=2).rank_coords(0), world, world)
    status = groups.enable_fast_all_reduce(8192, torch.float32, torch.device("cpu"))
    assert status["enabled"] is False and "cpu" in status["reason"] and groups.fast_ar is None
    x = torch.ones(4)
    assert groups.all_reduce_tp(x) is x and torch.equal(x, torch.ones(4))
