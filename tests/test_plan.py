"""make_plan behaviour (verdicts, communication, pipeline, request rate) and the `plan` / `recipe schema` CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from enginesmith.builders.cli.commands_plan import register
from enginesmith.builders.planner.perf_constants import LAYER_FIXED_US, MULTI_TOKEN_LAYER_FIXED_US
from enginesmith.builders.planner.plan import make_plan
from enginesmith.builders.recipe import ParallelSection, load_recipe, parse_recipe
from enginesmith.builders.planner.roofline import best_micro_batches, bubble_fraction

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))
REPO = Path(__file__).resolve().parent.parent


def recipe_of(name: str):
    return load_recipe(REPO / "recipes" / f"{name}.yaml")


def variant(recipe, **sections):
    """Copy of `recipe` with sections replaced (dicts are merged into the existing section)."""
    data = recipe.model_dump()
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data[key], dict) else value
    return parse_recipe(data)


@pytest.fixture()
def cli():
    app = typer.Typer()
    register(app)
    return app


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_plans_and_serialises(path):
    plan = make_plan(load_recipe(path))
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["recipe"]["name"] == path.stem and d["spec"]["architecture"] == plan.spec.architecture
    assert d["mapping"]["world_size"] == len(d["ranks"]) == plan.world_size
    expert_split = {"moe_ep_rank", "moe_tp_rank", "experts"} if plan.spec.is_moe else set()
    assert set(d["ranks"][0]) == {"rank", "tp_rank", "pp_rank", "node", "local_gpu", "layers", "memory"} | expert_split
    assert d["sla"]["binding"] in ("compute", "memory bandwidth", "communication", "KV capacity",
                                   "memory capacity", "max_batch_size")
    assert d["prefill"]["floor_ms"] > 0 and d["decode"]["floor_ms"] > 0
    assert len(d["quantization_options"]) == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.batch = 3  # type: ignore[misc]


def test_verdict_names_the_binding_constraint():
    tiny = recipe_of("tiny-llama")
    assert make_plan(variant(tiny, sla={"tpot_ms": 1e-4}), with_options=False).sla.binding == "memory bandwidth"
    slow_prefill = make_plan(variant(tiny, sla={"ttft_ms": 1e-4, "isl": 256}), with_options=False)
    assert not slow_prefill.sla.meets and slow_prefill.sla.binding == "compute"
    assert slow_prefill.sla.binding_check == "ttft"
    big = recipe_of("llama2-13b-tp2-24gb")
    kv = make_plan(variant(big, sla={"concurrency": 16, "isl": 2048, "osl": 2048}), with_options=False)
    assert not kv.sla.meets and kv.sla.binding == "KV capacity" and kv.memory.kv_tokens < 16 * 4096
    queue = make_plan(variant(big, sla={"concurrency": 17, "isl": 64, "osl": 64}), with_options=False)
    assert queue.sla.binding == "max_batch_size" and queue.batch == 16
    ok = make_plan(big, with_options=False)
    assert ok.sla.meets and "meets the SLA" in ok.sla.summary


def test_cross_node_tp_uses_the_inter_node_link():
    big = recipe_of("llama2-13b-tp2-24gb")
    spread = make_plan(variant(big, hardware={"gpus_per_node": 1, "nodes": 2}), with_options=False)
    link = {c.kind: c.link for c in spread.decode.comm}
    assert link["tp_allreduce"] == "infiniband" and any("spans nodes" in n for n in spread.notes)
    local = make_plan(big, with_options=False)
    assert {c.kind: c.link for c in local.decode.comm}["tp_allreduce"] == "pcie"
    assert spread.decode.comm_ms > local.decode.comm_ms


def test_moe_block_is_one_tp_all_reduce_whatever_the_expert_split():
    """TensorRT-LLM and the reference runtime reduce the MoE block's partial sums over the whole TP group (each
    rank runs its experts, or its slice of each, on every token): no all-to-all, so every EP/TP split
    communicates the same."""
    tiny = recipe_of("tiny-mixtral")
    for target in ("trtllm-engine", "reference"):
        plans = {ep: make_plan(variant(tiny, parallel={"tp_size": 4, "moe_ep_size": ep}, build={"target": target}),
                               with_options=False) for ep in (1, 2, 4)}
        assert [(p.mapping.moe_ep_size, p.mapping.moe_tp_size) for p in plans.values()] == [(1, 4), (2, 2), (4, 1)]
        tokens, layers, h, act = plans[1].batch, 3, 64, 4  # float32 tiny model
        for p in plans.values():
            comm = {c.kind: c for c in p.decode.comm}
            assert set(comm) == {"tp_allreduce", "lm_head_allgather"} and p.decode.target == target
            ar = comm["tp_allreduce"]
            assert (ar.group_size, ar.count, ar.bytes_per_op) == (4, 2 * layers, tokens * h * act)
            assert p.decode.comm == plans[1].decode.comm and p.decode.comm_ms == plans[1].decode.comm_ms
        assert [r.experts for r in plans[2].ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2


def test_reference_runtime_sends_the_logits_to_rank0_with_pp():
    """runtime/parallel/pipeline.py: the last stage's TP rank 0 sends the float32 logits of each micro-batch to rank 0,
    which samples; TensorRT-LLM samples on the last stage."""
    tiny = variant(recipe_of("tiny-llama"), parallel={"tp_size": 2, "pp_size": 2})
    ref = make_plan(tiny, with_options=False)
    engine = make_plan(variant(tiny, build={"target": "trtllm-engine"}), with_options=False)
    logits = {c.kind: c for c in ref.decode.comm}["logits_to_rank0"]
    assert logits.bytes_per_op == -(-ref.batch // ref.decode.micro_batches) * 315 * 4  # vocab 315, float32
    assert "logits_to_rank0" not in {c.kind for c in engine.decode.comm}
    assert ref.decode.comm_ms == pytest.approx(engine.decode.comm_ms + 1e3 * logits.time_s)
    single = make_plan(variant(tiny, parallel={"tp_size": 2, "pp_size": 1}), with_options=False)
    assert "logits_to_rank0" not in {c.kind for c in single.decode.comm}


def test_rendered_plan_names_the_target_of_its_communication_and_no_expert_split_for_dense_models():
    from rich.console import Console

    from enginesmith.builders.planner.plan_render import render

    def text(plan) -> str:
        console = Console(width=400, record=True, file=io.StringIO())
        render(plan, console)
        return console.export_text()

    dense = text(make_plan(variant(recipe_of("llama2-13b-tp2-24gb"), build={"target": "reference"})))
    assert "communication per step, as build target reference runs it" in dense
    assert "reference runtime: per layer two all-reduces over the TP group" in dense
    assert "moe_tp" not in dense and "moe_ep" not in dense and " mtp" not in dense.replace("┃", " ")
    moe = text(make_plan(recipe_of("mixtral-8x22b-16xa100")))
    assert "communication per step, as build target trtllm-engine runs it" in moe
    assert "moe_ep_size 1 x moe_tp_size 4" in moe and "parallel: auto chose tp4 pp1 ep1 mtp4" in moe
    tie = next(line for line in moe.splitlines() if "tp4 pp1 ep2 mtp2" in line)
    assert "ties with the chosen layout (the MoE block is one TP all-reduce whatever the EP/TP split)" in tie


def test_a_dense_models_plan_has_no_expert_split_in_json_or_search():
    """The JSON (plan --json, plan --out) and `auto`'s search of a dense model name no moe_ep / moe_tp size: it
    has one MLP split, the TP one; a MoE model's keep theirs."""
    dense = variant(recipe_of("llama2-13b-tp2-24gb"), parallel="auto")
    plan = make_plan(dense, with_options=False)
    text = json.dumps(plan.to_dict())
    assert "moe_tp" not in text.replace('"moe_tp_size": null', "") and "moe_ep" not in text.replace(
        '"moe_ep_size": null', "")  # the recipe's own parallel fields stay, unset
    assert plan.search.rejected_by_shape == 0 and not plan.search.shape_examples
    assert {c.layout for c in plan.search.runners_up} <= {"tp1 pp1", "tp1 pp2", "tp2 pp1"}
    from rich.console import Console

    from enginesmith.builders.planner.plan_render import render

    console = Console(width=400, record=True, file=io.StringIO())
    render(plan, console)
    shown = console.export_text()
    assert "Scored 3 layouts" in shown and "moe_" not in shown and "rejected" not in shown
    moe = make_plan(recipe_of("tiny-mixtral"), with_options=False).to_dict()
    assert {"moe_tp_size", "moe_ep_size"} <= set(moe["mapping"]) and "moe_tp_rank" in moe["ranks"][0]


def test_pipeline_bubble_and_micro_batches():
    assert bubble_fraction(2, 2) == pytest.approx(1 / 3)
    assert bubble_fraction(4, 16) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 1) == 0
    # T = 180 ms of stage work, c = 3 ms per micro-batch: 1 - (T + c) / ((m+p-1)(T/m + c)) = 1 - 0.183 / 0.2295
    assert bubble_fraction(2, 8, per_micro_s=0.003, stage_s=0.18) == pytest.approx(1 - 0.183 / 0.2295)
    assert bubble_fraction(2, 1, per_micro_s=0.003, stage_s=0.18) == pytest.approx(1 / 2)
    # (m+1)(0.18/m + 0.003): m=7 -> 0.04671, m=8 -> 0.04650, m=9 -> 0.04700 (optimum near sqrt(60) = 7.7)
    assert best_micro_batches(2, 0.18, 0.003, cap=64) == 8
    assert best_micro_batches(2, 0.18, 0.003, cap=4) == 4 and best_micro_batches(2, 0.18, 0.0, cap=16) == 16
    tiny = variant(recipe_of("tiny-llama"), sla={"concurrency": 16})
    by_m = {m: make_plan(variant(tiny, parallel={"tp_size": 1, "pp_size": 3, "pp_micro_batches": m}),
                         with_options=False) for m in (1, 2, 4, 8, 16)}  # divisors of the batch: equal micro-batches
    burst = {m: p.prefill_burst.estimate_ms for m, p in by_m.items()}
    for m, p in by_m.items():  # every micro-batch (of several tokens) pays each one-layer stage's fixed time
        assert p.prefill_burst.fixed_ms == pytest.approx(m * 3 * (LAYER_FIXED_US + MULTI_TOKEN_LAYER_FIXED_US) * 1e-3)
    # a one-layer stage of the tiny model does ~0.7 ms of work on the 16 prompts, next to 45.5 us of fixed time per
    # multi-token micro-batch: splitting helps up to 4-8 micro-batches (optimum near sqrt(2 T / c) ~ 5.5), 16 cost
    # more than they save
    assert burst[1] > burst[2] > burst[4] < burst[16] and burst[8] < burst[16]
    assert abs(burst[8] - burst[4]) < 0.01 * burst[4]
    pp3 = make_plan(variant(tiny, parallel={"tp_size": 1, "pp_size": 3}), with_options=False)
    assert pp3.batch == 16 and 4 < pp3.pipeline.micro_batches <= 12  # the fastest m up to min(4 * pp_size, batch)
    assert pp3.prefill_burst.estimate_ms <= 1.01 * min(burst.values())
    assert pp3.pipeline.decode_micro_batches == 3 and [r.layers for r in pp3.ranks] == [[0], [1], [2]]
    assert by_m[1].pipeline.bubble_fraction == pytest.approx(2 / 3)  # one micro-batch: no fixed-cost excess
    assert by_m[2].pipeline.bubble_fraction > 2 / 4  # (p-1)/(m+p-1) plus the second micro-batch's fixed time


def test_request_rate_sets_concurrency_by_littles_law():
    tiny = recipe_of("llama2-13b-tp2-24gb")
    plan = make_plan(variant(tiny, sla={"concurrency": None, "request_rate": 2.0}), with_options=False)
    s = plan.recipe.sla
    e2e_s = (plan.prefill.estimate_ms + (s.osl - 1) * plan.decode.estimate_ms) / 1e3
    assert plan.concurrency == math.ceil(2.0 * e2e_s) and plan.batch == min(plan.concurrency, 16)


def test_fp8_runs_only_where_the_gpu_has_it():
    r70 = recipe_of("llama3-70b-tp2-pp2")
    fp8 = make_plan(variant(r70, quantization={"weights": "fp8", "kv_cache": "fp8"}), with_options=False)
    bf16 = make_plan(r70, with_options=False)
    assert fp8.prefill.compute_ms == pytest.approx(bf16.prefill.compute_ms * 989.4 / 1978.9, rel=0.01)
    assert fp8.memory.kv_bytes_per_token_max * 2 == bf16.memory.kv_bytes_per_token_max
    opts = {q.weights: q for q in make_plan(variant(r70, hardware={"gpu": "A100-80"})).quantization_options}
    assert not opts["fp8"].runnable and "use int8_weight_only (W8A16) or int4_weight_only" in opts["fp8"].reason


def test_make_plan_uses_a_given_spec_without_lookup():
    from enginesmith.builders.specs import load_shipped

    r = parse_recipe({"name": "x", "model": {"source": "nobody/not-on-the-hub"},
                      "parallel": {"tp_size": 2}, "build": {"max_seq_len": 512, "max_input_len": 256}})
    plan = make_plan(r, spec=load_shipped("tiny-llama"), with_options=False)
    assert plan.mapping.tp_size == 2 and any("padded from 315 to 316" in n for n in plan.notes)
    assert r.parallel == ParallelSection(tp_size=2)


def test_cli_plan_json_tables_and_out(cli, tmp_path):
    runner = CliRunner()
    recipe = str(REPO / "recipes" / "tiny-mixtral.yaml")
    res = runner.invoke(cli, ["plan", recipe, "--json", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["mapping"]["tp_size"] == 1 and plan["spec"]["num_experts"] == 8
    written = json.loads((tmp_path / "tiny-mixtral" / "plan.json").read_text())
    assert written["sla"] == plan["sla"]
    res = runner.invoke(cli, ["plan", str(REPO / "recipes" / "mixtral-8x22b-16xa100.yaml")],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "parallel: auto chose" in res.stdout and "SLA" in res.stdout
    assert "no FP8 tensor cores" in res.stdout


def test_cli_bad_recipe_writes_nothing(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: {source: meta-llama/Llama-2-13b-hf}\nparallel: {tp_size: 3}\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["plan", str(bad), "--out", str(out)])
    assert res.exit_code == 2
    assert "parallel.tp_size: 3 does not divide num_attention_heads=40" in res.stderr
    assert not out.exists()


def test_cli_check_fails_when_the_sla_is_missed(cli, tmp_path):
    tight = tmp_path / "tight.yaml"
    tight.write_text((REPO / "recipes" / "tiny-llama.yaml").read_text().replace("tpot_ms: 1000", "tpot_ms: 0.0001"))
    res = CliRunner().invoke(cli, ["plan", str(tight), "--check"])
    assert res.exit_code == 1 and "misses the SLA" in res.stdout


def test_cli_recipe_schema(cli, tmp_path):
    runner = CliRunner()
    target = tmp_path / "schema.json"
    assert runner.invoke(cli, ["recipe", "schema", "--output", str(target)]).exit_code == 0
    schema = json.loads(target.read_text())
    assert set(schema["properties"]) == {"name", "model", "hardware", "parallel", "quantization", "build",
                                         "serve", "sla"}
    res = runner.invoke(cli, ["recipe", "schema"])
    assert json.loads(res.stdout) == schema


def test_the_real_cli_registers_plan_and_recipe():
    from enginesmith.builders.cli import app

    res = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "tiny-llama.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["recipe"]["name"] == "tiny-llama"


def test_auto_explains_when_nothing_meets_the_sla():
    kimi = recipe_of("kimi-k2-16xa100")
    plan = make_plan(variant(kimi, quantization={"weights": "none"}), with_options=False)
    assert not plan.sla.meets and plan.sla.binding == "memory capacity"
    assert plan.search.chosen_reason.startswith("no layout on up to 16 GPUs meets the SLA; closest:")
    assert all(not c.meets for c in plan.search.runners_up)
