"""Every (tp, pp, moe_ep, moe_tp) up to world size 16, for every shipped spec: valid or invalid, and why."""

from __future__ import annotations

import re

import pytest

from enginesmith.builders.planner.layout_rules import candidate_mappings, mapping_violations, valid_mappings
from enginesmith.builders.mapping import Mapping, ep_experts, pad_vocab_size, pp_layers
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.specs import load_shipped, shipped_names
from enginesmith.builders.planner.weights import global_shards, layer_shards

MAX_WORLD = 16


def trtllm_accepts(s: ModelSpec, tp: int, pp: int, ep: int, mtp: int) -> bool:
    """TensorRT-LLM's shape rules, written out independently of builders.planner.layout_rules."""
    heads_split = s.num_attention_heads % tp == 0
    kv_split = s.is_mla or s.num_key_value_heads % tp == 0 or tp % s.num_key_value_heads == 0
    has_dense_mlp = not s.is_moe or s.first_k_dense_replace > 0
    mlp_split = not has_dense_mlp or s.intermediate_size % tp == 0
    shared_split = s.n_shared_experts == 0 or (s.n_shared_experts * s.moe_intermediate_size) % tp == 0
    if s.is_moe:
        moe_split = s.num_experts % ep == 0 and s.moe_intermediate_size % mtp == 0
    else:
        moe_split = ep == 1
    return heads_split and kv_split and mlp_split and shared_split and moe_split and pp <= s.num_hidden_layers


def numel(shards, component: str) -> int:
    return sum(x.numel for x in shards if x.component == component)


def check_conservation(s: ModelSpec, m: Mapping) -> None:
    """Summed over a TP group, every split tensor adds back up to the model's (plus the known replicas)."""
    one = Mapping(world_size=1)
    h = s.hidden_size
    for stage in range(m.pp_size):
        layers = list(pp_layers(s.num_hidden_layers, m.pp_size, stage))
        for i in layers:
            full, part = layer_shards(s, i, one), layer_shards(s, i, m)
            for comp in ("mlp", "experts", "shared_experts"):
                assert m.tp_size * numel(part, comp) == numel(full, comp), (comp, m)
            if s.is_mla:
                replicated = (s.q_lora_rank + s.kv_lora_rank + s.qk_rope_head_dim) * h
                extra = (m.tp_size - 1) * replicated
            else:
                extra = 2 * max(0, m.tp_size - s.num_key_value_heads) * s.head_dim * h  # duplicated KV heads
                extra += 2 * max(0, m.tp_size - s.num_key_value_heads) * s.head_dim * s.attn_bias
            assert m.tp_size * numel(part, "attention") == numel(full, "attention") + extra, m
            assert numel(part, "router") == numel(full, "router")  # replicated
        g = global_shards(s, m, stage)
        assert numel(g, "embedding") == (s.vocab_size * h if stage == 0 else 0)
        last = stage == m.pp_size - 1
        assert m.tp_size * numel(g, "lm_head") == (pad_vocab_size(s.vocab_size, m.tp_size) * h if last else 0)


@pytest.mark.parametrize("name", shipped_names())
def test_every_layout_up_to_16_gpus(name):
    s = load_shipped(name)
    valid = invalid = 0
    for m in candidate_mappings(MAX_WORLD):
        problems = mapping_violations(s, m, MAX_WORLD)
        expected = trtllm_accepts(s, m.tp_size, m.pp_size, m.moe_ep_size, m.moe_tp_size)
        assert (not problems) == expected, (m, problems)
        if expected:
            valid += 1
            check_conservation(s, m)
            continue
        invalid += 1
        for p in problems:
            assert p.field.startswith("parallel.")
            for value, target in re.findall(r"(\d+) does not divide \S+=(\d+)", p.message):
                assert int(target) % int(value) != 0, p  # the number really does not divide
            if "valid:" in p.message:
                listed = re.search(r"valid(?: with tp_size=\d+)?: ([\d, ]+|none)", p.message).group(1)
                assert listed != "none" or p.field != "parallel.tp_size"
    assert valid == len(valid_mappings(s, MAX_WORLD)) and valid + invalid == 110
    assert valid >= min(MAX_WORLD, s.num_hidden_layers)  # tp=1 with every pp <= layers is always valid


def test_valid_layout_counts_by_hand():
    # Llama-2-13B: tp must divide 40 heads and 13824 -> {1, 2, 4, 8}; pp <= 16 // tp; dense so ep = 1.
    assert len(valid_mappings(load_shipped("llama-2-13b"), MAX_WORLD)) == 16 + 8 + 4 + 2
    # Mixtral-8x22B: tp in {1, 2, 4, 8, 16} (48 heads, 8 KV heads); ep | tp and ep | 8 experts.
    assert len(valid_mappings(load_shipped("mixtral-8x22b"), MAX_WORLD)) == 16 * 1 + 8 * 2 + 4 * 3 + 2 * 4 + 1 * 4


@pytest.mark.parametrize("name", ["tiny-mixtral", "mixtral-8x22b", "kimi-k2"])
def test_ranks_cover_layers_and_experts_exactly_once(name):
    s = load_shipped(name)
    for m in valid_mappings(s, 8):
        layers_by_tp_rank: dict[int, list[int]] = {}
        experts: dict[tuple[int, int, int], list[int]] = {}
        for c in m.ranks():
            layers_by_tp_rank.setdefault(c.tp_rank, []).extend(pp_layers(s.num_hidden_layers, m.pp_size, c.pp_rank))
            key = (c.pp_rank, c.moe_tp_rank, 0)
            experts.setdefault(key, []).extend(ep_experts(s.num_experts, m.moe_ep_size, c.moe_ep_rank))
        assert all(v == list(range(s.num_hidden_layers)) for v in layers_by_tp_rank.values())
        assert all(sorted(v) == list(range(s.num_experts)) for v in experts.values())
