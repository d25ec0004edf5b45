"""The real served tiny model for the client/bench/analyze/metrics tests: built once per test process.

Tiny random llama -> plan -> converted checkpoint -> reference engine dir -> the generated Triton repository
(ensemble, preprocessing, tensorrt_llm running our reference runtime, postprocessing, BLS) -> a real
tritonserver on free ports. build.max_batch_size is 2, so a handful of concurrent requests queue (the
crafted overload of the analysis tests) while one at a time does not. KV-cache reuse is on (upstream's default).
"""

from __future__ import annotations

import atexit
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO_ROOT, tiny_hf_model

MAX_BATCH = 2


@dataclass
class Served:
    recipe: Any
    plan: Any
    server: Any
    tokenizer_dir: Path
    root: Path

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url


def tiny_recipe(hf: Path):
    from enginesmith.builders.recipe import parse_recipe

    data = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-llama.yaml").read_text())
    data["model"]["source"] = str(hf)
    data["build"]["max_batch_size"] = MAX_BATCH
    data["serve"]["triton_max_batch_size"] = MAX_BATCH
    data["serve"]["enable_kv_cache_reuse"] = True
    return parse_recipe(data)


@functools.lru_cache(maxsize=None)
def served_tiny() -> Served:
    """Build and start once; stopped when the test process exits."""
    from enginesmith.builders.build.reference import build_reference
    from enginesmith.builders.convert import convert_checkpoint
    from enginesmith.builders.model_spec import ModelSpec
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.triton_repo.repository import write_repo
    from enginesmith.triton_repo.server import TritonServer

    root = Path(tempfile.mkdtemp(prefix="enginesmith-served-"))
    hf = tiny_hf_model("llama")
    recipe = tiny_recipe(hf)
    plan = make_plan(recipe, with_options=False)
    ckpt = root / "checkpoint"
    convert_checkpoint(hf, ckpt, plan.mapping, ModelSpec.from_pretrained_dir(hf), "float32", "none", workers=1)
    build_reference(recipe, plan, ckpt, root / "engine")
    tokenizer_dir = ckpt / "tokenizer"
    write_repo(recipe, plan, root / "engine", tokenizer_dir, root / "repo")
    server = TritonServer(root / "repo", log_path=root / "server.log", ).start()
    atexit.register(server.stop)
    return Served(recipe, plan, server, tokenizer_dir, root)
