"""The reference runtime across ranks (gloo on CPU): in-process engines and a real tritonserver.

Greedy outputs of tp=2, pp=2, tp=2 x pp=2 and the tiny MoE with moe_ep=2 must equal tp=1 outputs
token for token, served also with the engine in a process of its own (tp=2 x pp=2); each rank process
loads only its own rank file. Idling for longer than the liveness timeout (a short one in-process and served)
changes nothing; a rank that dies or hangs is named within the timeout, and stops the server.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import time

import httpx
import numpy as np
import psutil
import pytest

from enginesmith.builders.mapping import Mapping
from enginesmith.runtime.engine.engine import Engine
from enginesmith.runtime.parallel.liveness import Liveness
from enginesmith.runtime.engine.request import Request
from enginesmith.runtime.engine.sampler import SamplingParams
from tests.support import convert_tiny
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


SHORT = Liveness(heartbeat_s=0.5, timeout_s=3.0)  # rank 0's idle heartbeat, and how long silence may last


def _await_failure(failures: queue.Queue, within_s: float) -> tuple[int, str]:
    try:
        return failures.get(timeout=within_s)
    except queue.Empty:
        raise AssertionError(f"no rank failure reported within {within_s} s") from None


def test_idle_ranks_keep_serving(engine_dirs):
    """Idle for twice the timeout: before heartbeats, each rank's wait for the next step timed out and it exited."""
    base = Engine.from_engine_dir(engine_dirs["llama_tp1"], device="cpu")
    expected = _generate_batched(base)
    base.shutdown()
    failures: queue.Queue = queue.Queue()
    engine = Engine.from_engine_dir(engine_dirs["llama_tp2_pp2"], device="cpu", liveness=SHORT,
                                    on_rank_failure=lambda rank, reason: failures.put((rank, reason)))
    try:
        assert _generate_batched(engine) == expected
        time.sleep(2 * SHORT.timeout_s)
        assert failures.empty(), failures.get()
        assert engine.workers.alive
        assert _generate_batched(engine) == expected
    finally:
        engine.shutdown()
    assert all(p.exitcode == 0 for p in engine.workers.procs.values())


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_dead_or_hung_rank_is_named_within_the_timeout(engine_dirs, how):
    """A killed rank is seen at once (its process exited); a stopped one by its missing heartbeats."""
    failures: queue.Queue = queue.Queue()
    engine = Engine.from_engine_dir(engine_dirs["llama_tp2"], device="cpu", liveness=SHORT,
                                    on_rank_failure=lambda rank, reason: failures.put((rank, reason)))
    victim = engine.workers.procs[1]
    try:
        assert len(_generate_batched(engine)[0]) == MAX_TOKENS
        os.kill(victim.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        rank, reason = _await_failure(failures, SHORT.timeout_s + SHORT.heartbeat_s + 1)
        assert rank == 1
        assert reason == ("rank 1 exited with code -9" if how == "killed" else
                          "rank 1 sent no heartbeat in 3 s (hung, or its node is gone)")
        assert not engine.workers.alive
        with pytest.raises(RuntimeError, match="a rank of the runtime has died"):
            engine.workers.forward(engine.model, engine.cache, None, 1)
    finally:
        if how == "hung":
            os.kill(victim.pid, signal.SIGCONT)
        engine.shutdown()
    assert not victim.is_alive()


PROCESS_LAYOUTS = {"llama_tp2_pp2_process": "llama_tp2_pp2"}
"""Served models whose engine runs in a process of its own (engine_process: true) -> the layout they serve."""


@pytest.fixture(scope="module")
def server(engine_dirs, tmp_path_factory):
    from tests.test_serve_reference import add_model, tensorrt_llm_config
    from enginesmith.triton_repo.server import TritonServer

    repo = tmp_path_factory.mktemp("ranks-repo")
    for name, engine_dir in engine_dirs.items():
        add_model(repo, name, tensorrt_llm_config(engine_dir, name))
    for name, layout in PROCESS_LAYOUTS.items():
        add_model(repo, name, tensorrt_llm_config(engine_dirs[layout], name, engine_process="true"))
    env = SERVED_LIVENESS | {"ENGINESMITH_ENGINE_PROCESS": ""}
    with TritonServer(repo, log_path=repo / "server.log", ready_timeout_s=240, env=env) as srv:
        yield srv


# The served ranks' liveness, set the way a deployment sets it: rank 0's idle heartbeat every 1 s, a rank silent for
# 5 s taken for hung (the control group's wait for rank 0's next message is bounded by the same 5 s).
SERVED_LIVENESS = {"ENGINESMITH_RANK_HEARTBEAT_S": "1", "ENGINESMITH_RANK_TIMEOUT_S": "5"}


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
def test_served_ranks_equal_single_rank_idle_and_rank_death_stops_server(server):
    results = {name: _served_greedy(server.http_url, name) for name in [*LAYOUTS, *PROCESS_LAYOUTS]}
    for name, (arch, *_rest) in LAYOUTS.items():
        assert results[name] == results[BASELINE[arch]], name
    for name in PROCESS_LAYOUTS:
        assert results[name] == results["llama_tp1"], name
    # Idle for 3x the served liveness timeout, which also bounds each rank's wait on the control group for rank 0's
    # next message: before heartbeats, every rank > 0 gave up that wait (and the server exited) once it elapsed
    # without requests (then 30 s).
    time.sleep(3 * Liveness.from_env(SERVED_LIVENESS).timeout_s)
    assert server.proc.poll() is None and server.is_ready()
    assert _served_greedy(server.http_url, "llama_tp2_pp2") == results["llama_tp1"]
    # Kill one rank of the tp=2 x pp=2 model: the server must go unready and exit within 30 s.
    server_proc = psutil.Process(server.proc.pid)
    spawned = [p for p in server_proc.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    # the ranks > 0 of tp2, pp2, tp2_pp2, ep2, then the engine process and its ranks > 0
    assert len(spawned) == (1 + 1 + 3 + 1) + (1 + 3), [p.cmdline() for p in spawned]
    victim = next(p for p in spawned if "/llama_tp2_pp2/1/model.py" in " ".join(p.parent().cmdline()))
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.proc.poll() is not None, "server still running 30 s after a rank died"
    assert re.fullmatch(r"tensorrt_llm \(reference\): rank [123] exited with code -9; stopping the server",
                        server.failure_reason())
