"""The reference runtime across ranks (gloo on CPU): in-process engines and a real tritonserver.

Greedy outputs of tp=2, pp=2, tp=2 x pp=2 and the tiny MoE with moe_ep=2 must equal tp=1 outputs
token for token; each rank process loads only its own rank file. A rank that dies stops the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import httpx
import numpy as np
import psutil
import pytest

from builders.mapping import Mapping
from runtime.engine import Engine
from runtime.request import Request
from runtime.sampler import SamplingParams
from tests.support import REPO_ROOT, convert_tiny
from tests.test_engine import write_engine_dir

PROMPTS = [[5, 17, 33, 2, 99], [120, 7, 8, 250, 311, 42, 3, 19, 23], [9, 9, 1], [64, 65, 66, 67, 68, 69]]
MAX_TOKENS = 12
LAYOUTS = {  # name -> (arch, tp, pp, moe_ep)
    "llama_tp1": ("llama", 1, 1, None),
    "llama_tp2": ("llama", 2, 1, None),
    "llama_pp2": ("llama", 1, 2, None),
    "llama_tp2_pp2": ("llama", 2, 2, None),
    "mixtral_tp1": ("mixtral", 1, 1, None),
    "mixtral_ep2": ("mixtral", 2, 1, 2),
}
BASELINE = {"llama": "llama_tp1", "mixtral": "mixtral_tp1"}


def _engine_dir(root, name):
    arch, tp, pp, ep = LAYOUTS[name]
    ckpt = convert_tiny(root / name, arch, Mapping.create(tp_size=tp, pp_size=pp, moe_ep_size=ep))
    return write_engine_dir(root / name / "engine", ckpt, pp_micro_batches=2)


def _generate_batched(engine: Engine) -> list[list[int]]:
    reqs = [Request(list(p), MAX_TOKENS, SamplingParams()) for p in PROMPTS]
    for r in reqs:
        engine.submit(r)
    engine.run_until_idle()
    return [r.output for r in reqs]


@pytest.fixture(scope="module")
def engine_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    return {name: _engine_dir(root, name) for name in LAYOUTS}


@pytest.mark.parametrize("name", ["llama_tp2", "llama_pp2", "llama_tp2_pp2", "mixtral_ep2"])
def test_engine_across_ranks_equals_single_rank(engine_dirs, name):
    base = Engine.from_engine_dir(engine_dirs[BASELINE[LAYOUTS[name][0]]], device="cpu")
    expected = _generate_batched(base)
    base.shutdown()
    engine = Engine.from_engine_dir(engine_dirs[name], device="cpu")
    try:
        assert engine.workers is not None and len(engine.workers.procs) == Mapping.create(
            *LAYOUTS[name][1:3], moe_ep_size=LAYOUTS[name][3]).world_size - 1
        assert _generate_batched(engine) == expected
        assert max(s.batch_size for s in engine.iteration_log) > 1
    finally:
        engine.shutdown()
    assert all(not p.is_alive() for p in engine.workers.procs.values())


@pytest.fixture(scope="module")
def server(engine_dirs, tmp_path_factory):
    from tests.test_serve_reference import tensorrt_llm_config
    from triton_repo.server import TritonServer

    repo = tmp_path_factory.mktemp("ranks-repo")
    for name, engine_dir in engine_dirs.items():
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(REPO_ROOT / "triton_repo" / "models" / "tensorrt_llm_reference.py", repo / name / "1" / "model.py")
        (repo / name / "config.pbtxt").write_text(tensorrt_llm_config(engine_dir).replace(
            'name: "tensorrt_llm"', f'name: "{name}"'))
    with TritonServer(repo, log_path=repo / "server.log", ready_timeout_s=240) as srv:
        yield srv


def _served_greedy(url: str, model: str) -> list[list[int]]:
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for p in PROMPTS:
            body = {"input_ids": p, "input_lengths": [len(p)], "request_output_len": [MAX_TOKENS]}
            r = c.post(f"/v2/models/{model}/generate", json=body)
            assert r.status_code == 200, r.text
            out.append(np.atleast_1d(r.json()["output_ids"]).tolist())
    return out


@pytest.mark.server
@pytest.mark.timeout(600)
def test_served_ranks_equal_single_rank_and_rank_death_stops_server(server):
    results = {name: _served_greedy(server.http_url, name) for name in LAYOUTS}
    for name, (arch, *_rest) in LAYOUTS.items():
        assert results[name] == results[BASELINE[arch]], name
    # Kill one rank of the tp=2 x pp=2 model: the server must go unready and exit within 30 s.
    server_proc = psutil.Process(server.proc.pid)
    ranks = [p for p in server_proc.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert len(ranks) == 1 + 1 + 3 + 1, [p.cmdline() for p in ranks]
    victim = next(p for p in ranks if p.parent().parent() and "llama_tp2_pp2" in " ".join(p.parent().cmdline()))
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.proc.poll() is not None, "server still running 30 s after a rank died"
