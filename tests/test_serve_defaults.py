"""Serving defaults at scale: BLS instances that do not serialise requests, a readiness wait sized by the load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from enginesmith.builders.cli.commands_repo import _ready_timeout
from enginesmith.builders.planner.plan import make_plan
from enginesmith.builders.recipe import parse_recipe
from enginesmith.builders.tiny_model import make_tokenizer
from tests.test_repository import config, reference_engine
from enginesmith.triton_repo.readiness import FLOOR_S, LOAD_GBPS, STARTUP_S, default_ready_timeout
from enginesmith.triton_repo.repository import write_repo

REPO = Path(__file__).resolve().parents[1]


def _tiny(**serve):
    data = yaml.safe_load((REPO / "recipes" / "tiny-llama.yaml").read_text())
    data["model"]["source"] = "/nonexistent/tiny-llama-hf"
    data["serve"].pop("bls_instances")
    data["serve"].update(serve)
    return parse_recipe(data)


@pytest.mark.parametrize("serve,count", [({}, 16), ({"triton_max_batch_size": 8}, 8), ({"bls_instances": 3}, 3)])
def test_bls_instances_default_to_the_batch(tmp_path, serve, count):
    tok = tmp_path / "tok"
    make_tokenizer(tok)
    r = _tiny(**serve)
    write_repo(r, make_plan(r, with_options=False), reference_engine(tmp_path / "engine"), tok, tmp_path / "repo")
    groups = config(tmp_path / "repo", "tensorrt_llm_bls").instance_group
    assert [(g.count, g.kind) for g in groups] == [(count, 2)]  # KIND_CPU
    assert config(tmp_path / "repo", "preprocessing").instance_group[0].count == 1


def test_ready_timeout_grows_with_the_bytes_each_rank_loads():
    gib = 1 << 30
    assert default_ready_timeout(gib) == FLOOR_S
    assert default_ready_timeout(66 * gib) == pytest.approx(STARTUP_S + 66 * gib / (LOAD_GBPS * 1e9))
    assert default_ready_timeout(66 * gib) > 400


def test_serve_default_comes_from_the_plan_and_an_explicit_value_wins():
    data = yaml.safe_load((REPO / "recipes" / "llama3-70b-tp2-pp2.yaml").read_text())
    data["parallel"] = {"tp_size": 1, "pp_size": 2}
    data["hardware"].update(gpu="H200", gpus_per_node=2, nodes=1)
    plan = make_plan(parse_recipe(data), with_options=False)
    per_rank = plan.memory.weight_bytes_max
    assert per_rank > 64 * (1 << 30)
    assert _ready_timeout(plan, None) == default_ready_timeout(per_rank) > 400
    assert _ready_timeout(plan, 42.0) == 42.0
