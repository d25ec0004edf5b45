"""What the plan says about the build target: TensorRT-LLM's micro-batches, custom code, FP8 checkpoints, multi-node."""

from __future__ import annotations

import json

import pytest

from enginesmith.builders.planner.plan import make_plan
from tests.test_plan import recipe_of, variant


def _plan(recipe):
    return make_plan(recipe, with_options=False)


def test_trtllm_targets_run_pp_size_micro_batches_and_the_reference_runs_the_recipes():
    r70 = variant(recipe_of("llama3-70b-tp2-pp2"), parallel={"tp_size": 2, "pp_size": 2, "pp_micro_batches": 8})
    engine = _plan(r70)
    assert engine.pipeline.micro_batches == 2 and engine.prefill_burst.micro_batches == 2
    assert 1 / 3 < engine.pipeline.bubble_fraction < 0.34
    assert any("parallel.pp_micro_batches=8 applies to the reference runtime only" in n for n in engine.notes)
    llmapi = _plan(variant(r70, build={"target": "trtllm-llmapi"}))
    assert llmapi.pipeline.micro_batches == 2
    reference = _plan(variant(r70, build={"target": "reference"}))
    assert reference.pipeline.micro_batches == 8 and reference.pipeline.bubble_fraction < 0.12
    assert not any("micro-batches in flight" in n for n in reference.notes)


def test_kimi_plan_warns_of_custom_code_fp8_weights_and_a_prequantized_checkpoint():
    kimi = recipe_of("kimi-k2-16xa100")
    assert kimi.model.trust_remote_code
    w = _plan(kimi).warnings
    assert any(s.startswith("model.trust_remote_code: true runs Python code from moonshotai/Kimi-K2-Instruct "
                            "(the tokenizer is custom code (tokenization_kimi.py") for s in w)
    assert any("published with FP8 weights" in s and "A100-80 (SM80) has no FP8" in s for s in w)
    assert any("already quantized to W4A16" in s for s in w)
    untrusted = _plan(variant(kimi, model={"trust_remote_code": False})).warnings
    assert any("set model.trust_remote_code: true" in s for s in untrusted)
    on_h200 = _plan(variant(kimi, hardware={"gpu": "H200"}, quantization={"weights": "none"})).warnings
    assert not any("FP8" in s or "quantized to" in s for s in on_h200)


def test_plain_recipes_have_no_warnings():
    for name in ("llama3-70b-tp2-pp2", "llama2-13b-tp2-24gb", "tiny-llama"):
        assert _plan(recipe_of(name)).warnings == [], name


def test_a_local_tokenizer_with_custom_code_asks_for_trust_remote_code(tmp_path):
    tiny = recipe_of("tiny-llama")
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 315, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}))
    plan = _plan(variant(tiny, model={"source": str(tmp_path), "spec": None}))
    assert any("tokenization_x.XTokenizer" in s and "set model.trust_remote_code: true" in s for s in plan.warnings)


@pytest.mark.parametrize("target,says", [("trtllm-engine", True), ("reference", False)])
def test_multi_node_engines_say_where_the_files_must_be(target, says):
    plan = _plan(variant(recipe_of("llama3-70b-tp2-pp2"), build={"target": target}))
    note = [n for n in plan.notes if n.startswith("2 nodes:")]
    assert bool(note) == says
    if says:
        assert "shared filesystem" in note[0] and "--ranks" in note[0]
