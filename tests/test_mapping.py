"""Exhaustive checks of builders.mapping over every (tp, pp, moe_ep, moe_tp) up to world size 16."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from enginesmith.builders.mapping import (
    Mapping,
    MappingError,
    ep_experts,
    kv_head_of_rank,
    kv_heads_per_rank,
    pad_vocab_size,
    pp_layers,
)

MAX_WORLD = 16


def all_tuples():
    """Every (tp, pp, moe_ep, moe_tp) with tp * pp <= 16 and moe sizes up to tp, valid or not."""
    for tp in range(1, MAX_WORLD + 1):
        for pp in range(1, MAX_WORLD // tp + 1):
            for ep, mtp in itertools.product(range(1, tp + 1), repeat=2):
                yield tp, pp, ep, mtp


def test_mapping_accepts_exactly_the_factorisations_of_tp():
    valid = invalid = 0
    for tp, pp, ep, mtp in all_tuples():
        if ep * mtp == tp:
            m = Mapping(world_size=tp * pp, tp_size=tp, pp_size=pp, moe_tp_size=mtp, moe_ep_size=ep)
            assert m.world_size == tp * pp
            valid += 1
        else:
            with pytest.raises(MappingError, match="moe_tp_size\\*moe_ep_size"):
                Mapping(world_size=tp * pp, tp_size=tp, pp_size=pp, moe_tp_size=mtp, moe_ep_size=ep)
            invalid += 1
    # sum over tp*pp <= 16 of d(tp) ordered factor pairs is the count of valid layouts
    expected = sum(sum(1 for d in range(1, tp + 1) if tp % d == 0) * (MAX_WORLD // tp) for tp in range(1, 17))
    assert valid == expected and invalid > valid


def test_world_size_must_equal_tp_times_pp():
    with pytest.raises(MappingError, match="world_size=6 must equal tp_size\\*pp_size=4"):
        Mapping(world_size=6, tp_size=2, pp_size=2, moe_tp_size=2)
    for name in ("world_size", "tp_size", "pp_size", "moe_tp_size", "moe_ep_size", "gpus_per_node"):
        kwargs = dict(world_size=1, tp_size=1, pp_size=1, moe_tp_size=1, moe_ep_size=1, gpus_per_node=8)
        kwargs[name] = 0
        with pytest.raises(MappingError, match=f"{name}=0 must be >= 1"):
            Mapping(**kwargs)


@pytest.mark.parametrize("gpus_per_node", [1, 2, 4, 8])
def test_rank_coordinates_follow_trtllm_order_for_every_layout(gpus_per_node):
    for tp, pp, ep, mtp in all_tuples():
        if ep * mtp != tp:
            continue
        m = Mapping(world_size=tp * pp, tp_size=tp, pp_size=pp, moe_tp_size=mtp, moe_ep_size=ep,
                    gpus_per_node=gpus_per_node)
        coords = m.ranks()
        # TP innermost, PP outermost; EP inside the TP group; nodes filled in rank order.
        seen = set()
        for c in coords:
            assert c.rank == c.pp_rank * tp + c.tp_rank
            assert c.tp_rank == c.moe_tp_rank * ep + c.moe_ep_rank
            assert 0 <= c.moe_ep_rank < ep and 0 <= c.moe_tp_rank < mtp and 0 <= c.pp_rank < pp
            assert c.node * gpus_per_node + c.local_gpu == c.rank
            seen.add((c.pp_rank, c.moe_tp_rank, c.moe_ep_rank))
        assert len(seen) == m.world_size  # a bijection between ranks and coordinates
        groups_tp = [m.tp_group(p) for p in range(pp)]
        groups_pp = [m.pp_group(t) for t in range(tp)]
        assert sorted(r for g in groups_tp for r in g) == list(range(m.world_size))
        assert sorted(r for g in groups_pp for r in g) == list(range(m.world_size))
        assert all(coords[r].pp_rank == p for p, g in enumerate(groups_tp) for r in g)
        assert all(coords[r].tp_rank == t for t, g in enumerate(groups_pp) for r in g)


def test_create_derives_moe_split_like_trtllm():
    for tp in range(1, MAX_WORLD + 1):
        divisors = [d for d in range(1, tp + 1) if tp % d == 0]
        m = Mapping.create(tp_size=tp)
        assert (m.moe_tp_size, m.moe_ep_size) == (tp, 1)
        for d in range(1, tp + 1):
            if d in divisors:
                assert Mapping.create(tp_size=tp, moe_ep_size=d).moe_tp_size == tp // d
                assert Mapping.create(tp_size=tp, moe_tp_size=d).moe_ep_size == tp // d
            else:
                with pytest.raises(MappingError, match="must divide tp_size"):
                    Mapping.create(tp_size=tp, moe_ep_size=d)
                with pytest.raises(MappingError, match="must divide tp_size"):
                    Mapping.create(tp_size=tp, moe_tp_size=d)
    with pytest.raises(MappingError, match="moe_ep_size=0 must be >= 1"):
        Mapping.create(tp_size=2, moe_ep_size=0)


def test_rank_and_group_bounds_are_checked():
    m = Mapping.create(tp_size=2, pp_size=2)
    for bad in (-1, 4):
        with pytest.raises(MappingError, match="outside"):
            m.rank_coords(bad)
    with pytest.raises(MappingError, match="pp_rank=2 outside"):
        m.tp_group(2)
    with pytest.raises(MappingError, match="tp_rank=-1 outside"):
        m.pp_group(-1)


@pytest.mark.parametrize("num_layers", [1, 3, 7, 40, 56, 61, 80])
def test_pp_layers_match_torch_tensor_split(num_layers):
    for pp in range(1, min(num_layers, MAX_WORLD) + 1):
        stages = [list(pp_layers(num_layers, pp, r)) for r in range(pp)]
        expected = [list(a) for a in np.array_split(np.arange(num_layers), pp)]  # same rule as tensor_split
        assert stages == expected
    with pytest.raises(MappingError, match="pp_size=.* must be in 1..num_hidden_layers"):
        pp_layers(num_layers, num_layers + 1, 0)
    with pytest.raises(MappingError, match="pp_rank=1 outside"):
        pp_layers(num_layers, 1, 1)


@pytest.mark.parametrize("num_experts", [8, 16, 256, 384])
def test_ep_experts_partition_contiguously(num_experts):
    for ep in range(1, MAX_WORLD + 1):
        if num_experts % ep:
            with pytest.raises(MappingError, match=f"moe_ep_size={ep} must divide num_experts={num_experts}"):
                ep_experts(num_experts, ep, 0)
            continue
        blocks = [list(ep_experts(num_experts, ep, r)) for r in range(ep)]
        assert [e for b in blocks for e in b] == list(range(num_experts))
        assert {len(b) for b in blocks} == {num_experts // ep}
        with pytest.raises(MappingError, match="outside"):
            ep_experts(num_experts, ep, ep)


def test_vocab_padding_and_kv_head_duplication():
    for vocab, tp in itertools.product([315, 32000, 32768, 128256, 163840], range(1, MAX_WORLD + 1)):
        padded = pad_vocab_size(vocab, tp)
        assert padded % tp == 0 and vocab <= padded < vocab + tp
    for nkv, tp in itertools.product([1, 2, 4, 8, 40], range(1, MAX_WORLD + 1)):
        per_rank = kv_heads_per_rank(nkv, tp)
        assert per_rank * tp >= nkv and (per_rank - 1) * tp < nkv
        if tp > nkv and tp % nkv == 0:
            assert per_rank == 1
            heads = [kv_head_of_rank(nkv, tp, r) for r in range(tp)]
            assert heads == sorted(heads) and {heads.count(h) for h in range(nkv)} == {tp // nkv}
