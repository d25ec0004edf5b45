"""Per-rank read plans and config.json against TensorRT-LLM's sharding rules (pure: no files read)."""

from __future__ import annotations

import pytest

from enginesmith.builders.convert.config import trtllm_config
from enginesmith.builders.convert.rank_plan import Read, Zeros, plan_rank, referenced_sources
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.tiny_model import ARCH_DEFAULTS, MODEL_VOCAB


def spec_of(arch: str, **overrides) -> ModelSpec:
    cfg = {k: v for k, v in ARCH_DEFAULTS[arch].items()} | {"vocab_size": MODEL_VOCAB} | overrides
    return ModelSpec.from_hf_config(cfg, name=f"tiny-{arch}")


def by_name(plans):
    return {p.name: p for p in plans}


def test_qkv_duplicates_kv_heads_when_tp_exceeds_kv_heads():
    spec = spec_of("llama")  # 8 heads, 2 kv heads, head_dim 8
    m = Mapping.create(tp_size=8)
    for tp_rank in range(8):
        qkv = by_name(plan_rank(spec, m, tp_rank, "float32"))["transformer.layers.0.attention.qkv.weight"]
        q, k, v = qkv.pieces
        assert q.rows == (tp_rank * 8, tp_rank * 8 + 8)  # one query head each
        kv_head = tp_rank * 2 // 8  # ranks 0-3 -> head 0, ranks 4-7 -> head 1
        assert k.rows == v.rows == (kv_head * 8, kv_head * 8 + 8)
        assert (k.source, v.source) == ("model.layers.0.self_attn.k_proj.weight",
                                        "model.layers.0.self_attn.v_proj.weight")
        assert qkv.shape == ((1 + 2 * 1) * 8, 64)


def test_qkv_splits_kv_heads_when_tp_divides_them():
    spec = spec_of("llama")
    m = Mapping.create(tp_size=2)
    qkv = by_name(plan_rank(spec, m, 1, "float32"))["transformer.layers.0.attention.qkv.weight"]
    assert [p.rows for p in qkv.pieces] == [(32, 64), (8, 16), (8, 16)]
    assert qkv.shape == (32 + 16, 64)


def test_row_and_column_splits():
    spec = spec_of("llama")  # intermediate 128, hidden 64
    plans = by_name(plan_rank(spec, Mapping.create(tp_size=4), 3, "bfloat16"))
    fc, gate, proj = (plans[f"transformer.layers.0.mlp.{n}.weight"] for n in ("fc", "gate", "proj"))
    assert fc.pieces == (Read("model.layers.0.mlp.gate_proj.weight", (32, 64), rows=(96, 128)),)  # fc = gate_proj
    assert gate.pieces == (Read("model.layers.0.mlp.up_proj.weight", (32, 64), rows=(96, 128)),)  # gate = up_proj
    assert proj.pieces == (Read("model.layers.0.mlp.down_proj.weight", (64, 32), cols=(96, 128)),)
    dense = plans["transformer.layers.0.attention.dense.weight"]
    assert dense.pieces == (Read("model.layers.0.self_attn.o_proj.weight", (64, 16), cols=(48, 64)),)
    assert plans["transformer.layers.0.input_layernorm.weight"].pieces[0].rows is None
    assert {p.dtype for p in plans.values()} == {"bfloat16"}


def test_uneven_pp_local_layers_and_stage_tensors():
    spec = spec_of("llama")  # 3 layers
    m = Mapping.create(tp_size=1, pp_size=2)  # stage 0: layers 0,1; stage 1: layer 2
    first, last = by_name(plan_rank(spec, m, 0, "float32")), by_name(plan_rank(spec, m, 1, "float32"))
    assert "transformer.vocab_embedding.weight" in first and "transformer.vocab_embedding.weight" not in last
    assert "lm_head.weight" in last and "transformer.ln_f.weight" in last
    assert "lm_head.weight" not in first and "transformer.ln_f.weight" not in first
    assert {n.split(".")[2] for n in first if n.startswith("transformer.layers.")} == {"0", "1"}
    assert {n.split(".")[2] for n in last if n.startswith("transformer.layers.")} == {"0"}
    q = last["transformer.layers.0.attention.qkv.weight"].pieces[0]
    assert q.source == "model.layers.2.self_attn.q_proj.weight"
    three = [by_name(plan_rank(spec, Mapping.create(pp_size=3), r, "float32")) for r in range(3)]
    assert [p["transformer.layers.0.post_layernorm.weight"].pieces[0].source for p in three] == [
        f"model.layers.{i}.post_attention_layernorm.weight" for i in range(3)]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_lm_head_vocab_padding(tp):
    spec = spec_of("llama")  # vocab 315: not divisible by 2, 4 or 8
    per = -(-315 // tp)
    rows = []
    for r in range(tp):
        head = by_name(plan_rank(spec, Mapping.create(tp_size=tp), r, "float32"))["lm_head.weight"]
        assert head.shape == (per, 64)
        reads = [p for p in head.pieces if isinstance(p, Read)]
        pads = [p for p in head.pieces if isinstance(p, Zeros)]
        rows += [i for p in reads for i in range(*p.rows)]
        assert sum(p.shape[0] for p in head.pieces) == per
        assert all(isinstance(p, Zeros) for p in head.pieces[len(reads):])  # padding only at the end
        assert len(pads) == (1 if r == tp - 1 and per * tp != 315 else 0)
    assert rows == list(range(315))
    emb = by_name(plan_rank(spec, Mapping.create(tp_size=tp), 0, "float32"))["transformer.vocab_embedding.weight"]
    assert emb.shape == (315, 64)  # use_parallel_embedding=false: full table on every first-stage rank


def test_moe_experts_blocked_by_ep_and_sliced_by_moe_tp_up_then_gate():
    spec = spec_of("mixtral")  # 8 experts, intermediate 96
    m = Mapping.create(tp_size=4, moe_ep_size=2, moe_tp_size=2)
    for rank in range(4):
        c = m.rank_coords(rank)
        plans = by_name(plan_rank(spec, m, rank, "float16"))
        fc, proj = plans["transformer.layers.1.mlp.fc.weight"], plans["transformer.layers.1.mlp.proj.weight"]
        experts = range(c.moe_ep_rank * 4, c.moe_ep_rank * 4 + 4)
        i0 = c.moe_tp_rank * 48
        expected_fc = [Read(f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight", (48, 64), rows=(i0, i0 + 48))
                       for e in experts for w in ("w3", "w1")]
        assert list(fc.pieces) == expected_fc
        assert fc.shape == (4, 96, 64) and fc.batch == 4
        assert list(proj.pieces) == [Read(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight", (64, 48),
                                          cols=(i0, i0 + 48)) for e in experts]
        router = plans["transformer.layers.1.mlp.router.weight"]
        assert router.dtype == "float32" and router.shape == (8, 64) and fc.dtype == "float16"
    assert [m.rank_coords(r).moe_ep_rank for r in range(4)] == [0, 1, 0, 1]


def test_qwen2_qkv_bias_follows_weight_rows():
    spec = spec_of("qwen2")
    plans = by_name(plan_rank(spec, Mapping.create(tp_size=4), 2, "float32"))
    w, b = plans["transformer.layers.0.attention.qkv.weight"], plans["transformer.layers.0.attention.qkv.bias"]
    assert [p.rows for p in b.pieces] == [p.rows for p in w.pieces]
    assert [p.source.rsplit(".", 1)[-1] for p in b.pieces] == ["bias"] * 3
    assert b.shape == (w.shape[0],)


def test_quantized_plans_store_transposed_int8_and_scale():
    spec = spec_of("mixtral")
    plans = by_name(plan_rank(spec, Mapping.create(tp_size=2, moe_ep_size=2), 0, "bfloat16", "W4A16"))
    fc = plans["transformer.layers.0.mlp.fc.weight"]
    assert fc.entries() == [("transformer.layers.0.mlp.fc.weight", "int8", (4, 64, 96)),
                            ("transformer.layers.0.mlp.fc.per_channel_scale", "bfloat16", (4, 192))]
    qkv = plans["transformer.layers.0.attention.qkv.weight"]
    assert qkv.entries()[0] == ("transformer.layers.0.attention.qkv.weight", "int8", (64, 24))
    for name in ("transformer.layers.0.mlp.router.weight", "transformer.vocab_embedding.weight",
                 "transformer.layers.0.input_layernorm.weight"):
        assert plans[name].quant_algo is None


def test_referenced_sources_cover_every_rank_read():
    for arch, m in (("llama", Mapping.create(2, 2)), ("mixtral", Mapping.create(8, 1, moe_ep_size=4))):
        spec = spec_of(arch)
        expected = referenced_sources(spec)
        read = {p.source for r in range(m.world_size) for t in plan_rank(spec, m, r, "float32")
                for p in t.pieces if isinstance(p, Read)}
        assert read == set(expected)


def test_config_json_fields():
    spec = spec_of("mixtral")
    cfg = trtllm_config(spec, Mapping.create(4, 1, moe_ep_size=2), "bfloat16", None,
                        {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert cfg["architecture"] == "MixtralForCausalLM" and cfg["hidden_act"] == "swiglu"
    assert cfg["rotary_base"] == 1e6 and cfg["rotary_scaling"] is None
    assert cfg["moe"]["num_experts"] == 8 and cfg["moe"]["top_k"] == 2 and cfg["moe"]["normalization_mode"] == 1
    assert cfg["mapping"] == {"world_size": 4, "gpus_per_node": 8, "cp_size": 1, "tp_size": 4, "pp_size": 1,
                              "moe_tp_size": 2, "moe_ep_size": 2, "moe_cluster_size": 1}
    assert cfg["vocab_size"] == 315 and cfg["head_size"] == 8 and cfg["position_embedding_type"] == "rope_gpt_neox"
    assert set(cfg["quantization"]) == {"quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val",
                                        "clamp_val", "use_meta_recipe", "has_zero_point", "pre_quant_scale",
                                        "exclude_modules"}
    llama = trtllm_config(spec_of("llama"), Mapping.create(1), "float16", "W8A16",
                          {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    assert llama["hidden_act"] == "silu" and llama["quantization"]["quant_algo"] == "W8A16"
    assert llama["rotary_base"] == 5e5 and llama["rotary_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    assert llama["moe"]["num_experts"] == 0 and llama["moe"]["top_k"] == 0
    qwen = trtllm_config(spec_of("qwen2"), Mapping.create(1), "float32")
    assert qwen["attn_bias"] is True and qwen["qwen_type"] == "qwen2"
