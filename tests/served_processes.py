"""The processes of a running tritonserver's Python models, found by their command lines, and a way to hold
one stopped while a test cancels a request: the cancellation travels while nothing is generated, so even a
loaded machine does not finish the request first."""

from __future__ import annotations

import contextlib
import time

import psutil

ENGINE_SETTLE_S = 2.0
"""How long a paused engine process stays paused after the block: the client's cancellation travels through
the front, Triton and the stub meanwhile (a loaded two-core machine takes a second and more)."""
STUB_SETTLE_S = 0.5
"""The same for a stub that runs its engine in a thread. Shorter: Triton's Python backend declares a stub
that has not reported for about a second unhealthy and kills it ("Stub process '...' is not healthy.")."""


def stub_process(server_pid: int, model: str) -> psutil.Process:
    """The Python-backend stub process that serves `model`."""
    stubs = [p for p in psutil.Process(server_pid).children(recursive=True)
             if f"/{model}/1/model.py" in " ".join(p.cmdline())]
    assert len(stubs) == 1, [p.cmdline() for p in stubs]
    return stubs[0]


def engine_process(server_pid: int, model: str) -> psutil.Process:
    """The engine process of `model` (parameter engine_process on): the spawned child of its stub."""
    (child,) = _spawned(stub_process(server_pid, model))
    return child


def engine_holder(server_pid: int, model: str) -> psutil.Process:
    """The process whose threads run `model`'s engine loop: its engine process, or the stub itself."""
    stub = stub_process(server_pid, model)
    return next(iter(_spawned(stub)), stub)


def _spawned(stub: psutil.Process) -> list[psutil.Process]:
    return [p for p in stub.children() if "spawn_main" in " ".join(p.cmdline())]


@contextlib.contextmanager
def paused(proc: psutil.Process):
    """`proc` stopped (SIGSTOP) for the block and a settling time after it: nothing is generated while what
    the block sent reaches the server."""
    settle_s = STUB_SETTLE_S if "model.py" in " ".join(proc.cmdline()) else ENGINE_SETTLE_S
    proc.suspend()
    try:
        yield
        time.sleep(settle_s)
    finally:
        proc.resume()
