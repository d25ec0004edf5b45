"""trtllm-build command lines: goldens for the reference recipes, validity against upstream's flag table.

The flag table is `upstream-templates/trtllm-build-flags.tsv` of the shared reference notes (a copy in
tests/data, or $ENGINESMITH_REFERENCE_DIR).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enginesmith.builders.build.engine_target import plan_engine_build
from enginesmith.builders.build.flags import (
    DEPRECATED_FLAGS,
    REMOVED_FLAGS,
    BuildFlagError,
    build_options,
    parse_ranks,
    shell_line,
)
from enginesmith.builders.build.trtllm_engine import runner_argv
from enginesmith.builders.planner.plan import make_plan
from enginesmith.builders.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
OUT = Path("out")


def _reference_dir() -> Path:
    """$ENGINESMITH_REFERENCE_DIR, else tests/data: its upstream-templates/ is a byte copy of the workplace's
    ../shared/reference/upstream-templates, so a clone anywhere checks against the same upstream facts."""
    return Path(os.environ.get("ENGINESMITH_REFERENCE_DIR", REPO / "tests" / "data"))


def upstream_flags() -> dict[str, dict]:
    """flag (and alias) -> {type, choices} parsed from the TSV."""
    path = _reference_dir() / "upstream-templates" / "trtllm-build-flags.tsv"
    if not path.is_file():
        pytest.fail(f"upstream flag table not found at {path}; set ENGINESMITH_REFERENCE_DIR")
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    header, flags = rows[0], {}
    assert header[:4] == ["flag", "type", "default", "choices"], header
    for name, typ, _default, choices, *_ in rows[1:]:
        names = [n.strip("()") for n in name.replace("alias", "").split() if n.strip("()")]
        allowed = choices.split("|") if "|" in choices and " " not in choices else None
        for n in names:
            flags[n] = {"type": typ, "choices": allowed}
    return flags


def _engine(recipe_path, ranks=None, recipe=None):
    recipe = recipe or load_recipe(recipe_path)
    plan = make_plan(recipe)
    root = OUT / recipe.name
    return plan_engine_build(recipe, plan, root / "checkpoint", root / "engine", ranks), plan


def _argv(recipe_path, **kw) -> list[str]:
    return list(_engine(recipe_path, **kw)[0].command.argv)


COMMON_TAIL = ("--kv_cache_type paged --tokens_per_block 32 --remove_input_padding enable --gpt_attention_plugin auto "
               "--context_fmha enable --use_paged_context_fmha enable --gemm_plugin auto "
               "--use_fp8_context_fmha disable")

GOLDEN = {
    # A10 (SM86), TP2 on one node: no Hopper fusions; dense fp16 -> fused gated MLP; --workers 2.
    "llama2-13b-tp2-24gb.yaml":
        "trtllm-build --checkpoint_dir out/llama2-13b-tp2-24gb/checkpoint --output_dir out/llama2-13b-tp2-24gb/engine "
        "--max_batch_size 16 --max_input_len 2048 --max_seq_len 4096 --max_num_tokens 4096 --max_beam_width 1 "
        f"{COMMON_TAIL} --use_fused_mlp enable --multiple_profiles enable --nccl_plugin auto "
        "--reduce_fusion disable --workers 2",
    # H100 TP2 x PP2 over 2 nodes of 2: no reduce_fusion with pp > 1 (so no user_buffer); 2 GPUs/node.
    "llama3-70b-tp2-pp2.yaml":
        "trtllm-build --checkpoint_dir out/llama3-70b-tp2-pp2/checkpoint --output_dir out/llama3-70b-tp2-pp2/engine "
        "--max_batch_size 64 --max_input_len 4096 --max_seq_len 8192 --max_num_tokens 8192 --max_beam_width 1 "
        f"{COMMON_TAIL} --use_fused_mlp enable --multiple_profiles enable --nccl_plugin auto "
        "--reduce_fusion disable --workers 2",
    # A100 MoE: moe_plugin, no dense gated MLP to fuse, no Hopper fusions; --workers = ranks of the auto layout.
    "mixtral-8x22b-16xa100.yaml":
        "trtllm-build --checkpoint_dir out/mixtral-8x22b-16xa100/checkpoint "
        "--output_dir out/mixtral-8x22b-16xa100/engine "
        "--max_batch_size 64 --max_input_len 4096 --max_seq_len 8192 --max_num_tokens 8192 --max_beam_width 1 "
        f"{COMMON_TAIL} --use_fused_mlp disable --moe_plugin auto --multiple_profiles enable --nccl_plugin auto "
        "--reduce_fusion disable --workers {workers}",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_trtllm_build_command(name):
    bp, plan = _engine(REPO / "recipes" / name)
    workers = min(plan.mapping.gpus_per_node, plan.mapping.world_size)
    assert shell_line(bp.command.argv) == GOLDEN[name].format(workers=workers)
    assert bp.command.all_ranks and runner_argv(bp.command) == list(bp.command.argv)


def test_golden_per_node_commands_of_the_multi_node_recipe():
    bp, plan = _engine(REPO / "recipes" / "llama3-70b-tp2-pp2.yaml")
    assert [(c.node, c.ranks) for c in bp.per_node] == [(0, (0, 1)), (1, (2, 3))]
    node1 = runner_argv(bp.per_node[1])
    assert node1[:6] == ["python", "-m", "enginesmith.builders.build.trtllm_engine", "--ranks", "2,3", "--"]
    assert shell_line(node1[6:]) == GOLDEN["llama3-70b-tp2-pp2.yaml"]


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_flag_exists_upstream_with_a_valid_value(recipe_path):
    table = upstream_flags()
    argv = _argv(recipe_path)
    assert argv[0] == "trtllm-build"
    i, seen = 1, []
    while i < len(argv):
        flag = argv[i]
        assert flag in table, f"{flag} is not a trtllm-build flag of the 1.2.x parser"
        seen.append(flag)
        row = table[flag]
        if row["type"].startswith("flag"):
            i += 1
            continue
        value = argv[i + 1]
        if row["type"] == "int":
            assert int(value) >= 0, (flag, value)
        if row["choices"] is not None:
            assert value in row["choices"], f"{flag} {value}: upstream accepts {row['choices']}"
        i += 2
    assert len(seen) == len(set(seen)), "a flag is given twice"
    assert not (REMOVED_FLAGS | DEPRECATED_FLAGS) & set(seen)


def test_removed_and_deprecated_flag_lists_agree_with_the_upstream_table():
    table = upstream_flags()
    assert "--max_decoder_seq_len" in table and "--max_seq_len" in table  # aliases parsed
    assert not REMOVED_FLAGS & set(table), "REMOVED_FLAGS lists a flag the 1.2.x parser still has"
    assert DEPRECATED_FLAGS <= set(table)


def _variant(path: str, **sections):
    recipe = load_recipe(REPO / "recipes" / path)
    return recipe.model_copy(update={k: getattr(recipe, k).model_copy(update=v) for k, v in sections.items()})


def _choices(recipe) -> dict[str, tuple[str | None, str]]:
    bp, _ = _engine(None, recipe=recipe)
    return {c.flag: (c.value, c.reason) for c in bp.choices}


def test_fp8_on_hopper_turns_on_fp8_kernels_and_user_buffer():
    tp4 = {"parallel": {"tp_size": 4, "pp_size": 1},
           "hardware": {"gpus_per_node": 4, "nodes": 1}}
    c = _choices(_variant("llama3-70b-tp2-pp2.yaml", quantization={"weights": "fp8", "kv_cache": "fp8"}, **tp4))
    assert c["--gemm_plugin"][0] == "disable"
    assert c["--use_fp8_context_fmha"][0] == "enable"
    assert c["--reduce_fusion"][0] == "enable" and c["--user_buffer"][0] == "enable"
    assert c["--use_fused_mlp"][0] == "enable"


def test_reduce_fusion_only_with_tp_and_no_pipeline():
    fp8 = {"quantization": {"weights": "fp8", "kv_cache": "fp8"}}
    pp = _choices(_variant("llama3-70b-tp2-pp2.yaml", **fp8))
    assert pp["--reduce_fusion"][0] == "disable" and "pp_size=2" in pp["--reduce_fusion"][1]
    assert "--user_buffer" not in pp
    tp = _choices(_variant("llama3-70b-tp2-pp2.yaml", parallel={"tp_size": 2, "pp_size": 1},
                           hardware={"gpus_per_node": 2, "nodes": 1}))
    assert tp["--reduce_fusion"][0] == "enable" and tp["--user_buffer"][0] == "disable"


def test_weight_only_turns_gated_mlp_fusion_off():
    c = _choices(_variant("llama2-13b-tp2-24gb.yaml", quantization={"weights": "int8_weight_only"}))
    assert c["--use_fused_mlp"] == ("disable", "trtllm-build turns gated-MLP fusion off for weight-only "
                                               "int8_weight_only")
    assert c["--gemm_plugin"][0] == "auto"


def test_paged_context_fmha_reason_follows_the_serve_options():
    c = _choices(_variant("llama2-13b-tp2-24gb.yaml", serve={"enable_kv_cache_reuse": True}))
    assert c["--use_paged_context_fmha"] == ("enable", "needed: the recipe turns on KV-cache reuse")


def test_single_gpu_leaves_collective_plugins_out():
    recipe = load_recipe(REPO / "recipes" / "tiny-llama.yaml")
    bp, _ = _engine(None, recipe=recipe)
    c = {ch.flag: ch for ch in bp.choices}
    assert not c["--nccl_plugin"].emitted and not c["--reduce_fusion"].emitted
    assert "--nccl_plugin" not in bp.command.argv and bp.command.argv[-2:] == ("--workers", "1")


def test_max_num_tokens_is_clamped_like_trtllm_build():
    recipe = _variant("tiny-llama.yaml", build={"max_batch_size": 2, "max_seq_len": 300, "max_num_tokens": 1024})
    assert _choices(recipe)["--max_num_tokens"][0] == "600"


def test_ranks_selection_and_workers():
    bp, _ = _engine(REPO / "recipes" / "llama3-70b-tp2-pp2.yaml", ranks=parse_ranks("2-3", 4))
    assert bp.command.ranks == (2, 3) and bp.command.node == 1 and not bp.command.all_ranks
    assert parse_ranks("0,2", 4) == (0, 2) and parse_ranks(None, 4) is None
    with pytest.raises(BuildFlagError, match=r"ranks must lie in 0\.\.3"):
        parse_ranks("4", 4)
    with pytest.raises(BuildFlagError, match="expected a list like 0,1"):
        parse_ranks("a", 4)


def test_ignored_factors_leave_the_engine_options_unchanged():
    """serve.* and sla.* are IGNORED_FACTORS of trtllm-engine: they must not change what trtllm-build gets."""
    base = build_options(_engine(None, recipe=_variant("llama3-70b-tp2-pp2.yaml"))[0].choices)
    runtime_only = _variant("llama3-70b-tp2-pp2.yaml",
                            serve={"enable_chunked_context": False, "enable_kv_cache_reuse": True,
                                   "kv_cache_free_gpu_mem_fraction": 0.5, "batch_scheduler_policy": "max_utilization"},
                            sla={"tpot_ms": 20.0})
    assert build_options(_engine(None, recipe=runtime_only)[0].choices) == base
    bigger = _variant("llama3-70b-tp2-pp2.yaml", build={"max_batch_size": 128})
    assert build_options(_engine(None, recipe=bigger)[0].choices) == {**base, "max_batch_size": "128"}
