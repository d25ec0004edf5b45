"""The reference engine in a process of its own (runtime/engine/engine_process.py), driven as the Triton model
drives it, without a server.

Outputs, log probs, finish reasons, KV block counts and timings equal the in-process engine's, and the engine's
metrics calls come back and are replayed; a rank dying inside the engine process is reported as in process; a
killed engine process fails what is in flight and is reported as rank 0's failure; a bad engine directory is
one clear error. Served through tritonserver (parity, concurrency, cancellation, metrics, a killed engine
process stopping the server): tests/test_serve_reference.py and tests/test_parallel_serving.py.
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import threading
from collections import Counter

import psutil
import pytest

from enginesmith.builders.mapping import Mapping
from enginesmith.runtime.engine.engine import Engine
from enginesmith.runtime.engine.engine_config import EngineConfig, EngineConfigError
from enginesmith.runtime.engine.engine_process import EngineCore, EngineProcess, engine_process_wanted
from enginesmith.runtime.engine.request import FinishReason, Request, RequestError, Status, TokenUpdate
from enginesmith.runtime.engine.sampler import SamplingParams
from enginesmith.runtime.parallel.liveness import Liveness
from tests.support import convert_tiny
from tests.test_engine import write_engine_dir

PROMPTS = [[5, 17, 33, 2, 99], [120, 7, 8, 250, 311, 42, 3, 19, 23], [9, 9, 1], [64, 65, 66, 67, 68, 69]]
SAMPLING = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=7, repetition_penalty=1.2),
            SamplingParams(end_id=241), SamplingParams(stop_words=((279, 279),))]  # greedy: 4th, 2nd-3rd tokens


class CallLog:
    """A metrics hook that keeps every call."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

    def count(self) -> Counter:
        return Counter(name for name, _, _ in self.calls)


class Finals:
    """on_update callbacks: collects every update and signals when `n` requests have finished."""

    def __init__(self, n: int):
        self.n, self.updates, self.done = n, [], threading.Event()

    def __call__(self, update) -> None:
        self.updates.append(update)
        if sum(u.finished for u in self.updates) == self.n:
            self.done.set()


@pytest.fixture(scope="module")
def engine_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-process")
    return {tp: write_engine_dir(root / f"tp{tp}" / "engine", convert_tiny(root / f"tp{tp}", "llama",
                                                                            Mapping.create(tp, 1)))
            for tp in (1, 2)}


def _requests(on_update=None) -> list[Request]:
    return [Request(list(p), 12, s, on_update=on_update) for p, s in zip(PROMPTS, SAMPLING, strict=True)]


def test_outputs_timings_and_metrics_equal_the_in_process_engine(engine_dirs):
    """Both engines get every request before their first step, so their batches (and floats) are the same."""
    local = Engine.from_engine_dir(engine_dirs[1], device="cpu", metrics=CallLog())
    expected = _requests()
    for r in expected:
        local.submit(r)
    local.run_until_idle()
    local.shutdown()
    remote = EngineProcess.from_engine_dir(engine_dirs[1], device="cpu")
    remote.metrics = CallLog()
    finals = Finals(len(PROMPTS))
    got = _requests(finals)
    try:
        for r in got:
            remote.submit(r)
        remote.start()
        assert finals.done.wait(60)
    finally:
        remote.shutdown()
    assert [r.output for r in got] == [r.output for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.log_probs == pytest.approx(b.log_probs, rel=1e-5)
    assert [r.finish_reason for r in got] == [r.finish_reason for r in expected]
    assert {r.finish_reason for r in got} == {FinishReason.LENGTH, FinishReason.END_ID, FinishReason.STOP_WORDS}
    assert all(r.status is Status.FINISHED and r.error is None for r in got)
    assert [r.kv_new_blocks for r in got] == [r.kv_new_blocks for r in expected]
    for r in got:
        assert 0 < r.arrival_ns <= r.first_scheduled_ns <= r.first_token_ns <= r.last_token_ns
    # every update went out in order: the tokens a request's callbacks saw are its output
    for r in got:
        assert [t for u in finals.updates if u.request is r for t in u.new_tokens] == r.output
    mine, theirs = remote.metrics.count(), local.metrics.count()
    for hook in ("on_first_token", "on_token", "on_request_done"):
        assert mine[hook] == theirs[hook], hook
    done = sorted(args for name, args, _ in remote.metrics.calls if name == "on_request_done")
    assert done == sorted(args for name, args, _ in local.metrics.calls if name == "on_request_done")
    assert mine["on_iteration"] >= 12


class _Sent:
    """The engine process's end of the pipe: keeps the last message."""

    def send(self, msg):
        self.msg = msg


def test_a_step_of_many_rows_leaves_the_garbage_collector_nothing_per_row():
    """An iteration's updates wait in flat lists until the step is sent: with a tuple and two lists per row, a
    256-row step made the engine process run a collection every step (in process it runs about none)."""
    core = EngineCore(_Sent())
    reqs = [Request([1, 2, 3], 8) for _ in range(256)]
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for key, r in enumerate(reqs):
            core._updated(key, TokenUpdate(r, [7], [-1.5], False))
        held = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert held < 16, f"{held} objects tracked by the garbage collector for 256 rows"


def test_a_step_message_carries_each_rows_tokens_timings_and_end():
    """What the serving side applies: several tokens in one update, a row with none, a finished and a failed row."""
    core = EngineCore(_Sent())
    engine_side = [Request([1, 2], 8, request_id=f"r{i}") for i in range(4)]
    for i, r in enumerate(engine_side):
        r.first_scheduled_ns, r.first_token_ns, r.last_token_ns = 10 + i, 20 + i, 30 + i
        r.kv_new_blocks, r.kv_reused_blocks = 2 + i, i
    done, failed = engine_side[2], engine_side[3]
    done.finish_reason, failed.finish_reason = FinishReason.END_ID, FinishReason.FAILED
    core._updated(0, TokenUpdate(engine_side[0], [5, 6], [-0.5, -0.25], False))
    core._updated(1, TokenUpdate(engine_side[1], [], [], False))
    core._updated(2, TokenUpdate(done, [9], [-1.0], True))
    core._updated(3, TokenUpdate(failed, [], [], True, "boom"))
    core.flush()
    kind, rows, _ = core.conn.msg
    assert kind == "step"

    class Proc:
        pid = 0

    serving = EngineProcess(Proc(), None, EngineConfig(), vocab_size=100, num_blocks=10)
    updates = []
    mirrors = [Request([1, 2], 8, on_update=updates.append) for _ in range(4)]
    serving._live = dict(enumerate(mirrors))
    serving._apply(rows)
    assert [(u.request, u.new_tokens, u.new_log_probs, u.finished, u.error) for u in updates] == [
        (mirrors[0], [5, 6], [-0.5, -0.25], False, None), (mirrors[1], [], [], False, None),
        (mirrors[2], [9], [-1.0], True, None), (mirrors[3], [], [], True, "boom")]
    assert [m.output for m in mirrors] == [[5, 6], [], [9], []]
    assert [(m.first_scheduled_ns, m.first_token_ns, m.last_token_ns, m.kv_new_blocks, m.kv_reused_blocks)
            for m in mirrors] == [(10 + i, 20 + i, 30 + i, 2 + i, i) for i in range(4)]
    assert [m.status for m in mirrors] == [Status.RUNNING, Status.RUNNING, Status.FINISHED, Status.FINISHED]
    assert [m.finish_reason for m in mirrors[2:]] == [FinishReason.END_ID, FinishReason.FAILED]
    assert mirrors[3].error == "boom" and list(serving._live) == [0, 1]  # finished rows leave the live set


def test_killed_engine_process_fails_what_is_in_flight_and_is_reported(engine_dirs):
    failures: queue.Queue = queue.Queue()
    engine = EngineProcess.from_engine_dir(engine_dirs[1], device="cpu",
                                           on_rank_failure=lambda rank, reason: failures.put((rank, reason)))
    finals = Finals(1)
    stalled = threading.Event()

    def on_update(update):
        finals(update)
        if not update.finished:
            stalled.wait()  # hold the receiver: the request stays in flight until the kill

    engine.start()
    r = Request([5, 6, 7], 110, on_update=on_update)
    engine.submit(r)
    os.kill(engine.pid, signal.SIGKILL)
    stalled.set()
    reason = f"the engine process (pid {engine.pid}) exited with code -9"
    assert failures.get(timeout=30) == (0, reason)
    assert finals.done.wait(10)
    assert r.finish_reason is FinishReason.FAILED and r.error == reason
    with pytest.raises(RequestError, match="shutting down"):
        engine.submit(Request([5], 1))
    engine.shutdown()


def test_rank_death_inside_the_engine_process_is_reported(engine_dirs):
    failures: queue.Queue = queue.Queue()
    short = Liveness(heartbeat_s=0.5, timeout_s=3.0)
    engine = EngineProcess.from_engine_dir(engine_dirs[2], device="cpu", liveness=short,
                                           on_rank_failure=lambda rank, reason: failures.put((rank, reason)))
    try:
        finals = Finals(1)
        engine.start()
        r = Request([5, 6, 7], 4, on_update=finals)
        engine.submit(r)
        assert finals.done.wait(60) and len(r.output) == 4
        (rank1,) = psutil.Process(engine.pid).children()
        os.kill(rank1.pid, signal.SIGKILL)
        assert failures.get(timeout=short.timeout_s + short.heartbeat_s + 5) == (1, "rank 1 exited with code -9")
    finally:
        engine.shutdown()
    assert engine._proc.exitcode == 0


@pytest.mark.parametrize("overrides", [{}, {"batch_scheduler_policy": "fifo"}])
def test_bad_engine_dir_or_option_is_one_clear_error_before_any_spawn(engine_dirs, tmp_path, overrides):
    engine_dir = engine_dirs[1] if overrides else tmp_path / "nope"
    with pytest.raises(EngineConfigError) as local:
        Engine.from_engine_dir(engine_dir, device="cpu", **overrides)
    before = psutil.Process().children()
    with pytest.raises(EngineConfigError) as remote:
        EngineProcess.from_engine_dir(engine_dir, **overrides)
    assert str(remote.value) == str(local.value)
    assert ("engine_config.json is missing" if not overrides else "batch_scheduler_policy='fifo'") in str(remote.value)
    assert psutil.Process().children() == before


@pytest.mark.parametrize("env,parameter,gpu,wanted", [
    ({}, None, False, False), ({}, None, True, True), ({}, True, False, True), ({}, False, True, False),
    ({"ENGINESMITH_ENGINE_PROCESS": "1"}, False, False, True), ({"ENGINESMITH_ENGINE_PROCESS": "0"}, True, True, False),
    ({"ENGINESMITH_ENGINE_PROCESS": ""}, True, False, True), ({"ENGINESMITH_ENGINE_PROCESS": "off"}, None, True, False),
])
def test_the_environment_wins_over_the_parameter_and_auto_means_where_there_is_a_gpu(env, parameter, gpu, wanted):
    assert engine_process_wanted(parameter, env, on_gpu=lambda: gpu) is wanted


def test_asking_for_a_gpu_initialises_no_cuda_here():
    """The stub asks through NVML; this machine (no GPU, or a GPU) answers, and torch's CUDA stays uninitialised."""
    import torch

    from enginesmith.runtime.engine.engine_process import cuda_visible

    assert cuda_visible() in (True, False)
    assert not torch.cuda.is_initialized() and "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ


def test_a_bad_switch_value_names_the_variable():
    with pytest.raises(ValueError, match=r"ENGINESMITH_ENGINE_PROCESS='maybe' is not a boolean: set 1 or 0"):
        engine_process_wanted(None, {"ENGINESMITH_ENGINE_PROCESS": "maybe"})
