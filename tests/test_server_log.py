"""Why a tritonserver failed, read from its log (errors first, no NVML/DCGM noise), and who holds a port."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.support import REPO_ROOT
from enginesmith.triton_repo.ports import free_port, port_holder, port_taken
from enginesmith.triton_repo.server import PortInUse, TritonServer, free_endpoints
from enginesmith.triton_repo.server_log import error_lines, failure_report, stop_signalled

LOG = (REPO_ROOT / "tests" / "data" / "tritonserver-failure.log").read_text()
"""Lines of real logs of the bundled server on a host without GPUs: a rank that died, a model that failed."""


def test_error_lines_come_first_without_noise_each_once():
    assert error_lines(LOG) == [
        "RuntimeError: [/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:47495",
        "tensorrt_llm (reference): rank 1 exited with code -9; stopping the server",
        "failed to load 'postprocessing' version 1: Internal: RuntimeError: boom",
        "error: creating server: Internal - failed to load all models",
    ]


def test_failure_report_lists_the_errors_else_the_last_meaningful_lines():
    report = failure_report(LOG, "/logs/server.log", max_errors=2)
    assert report.splitlines() == [
        "errors in the log (+2 more):",
        "  RuntimeError: [/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
        "peer [127.0.0.1]:47495",
        "  tensorrt_llm (reference): rank 1 exited with code -9; stopping the server",
        "log: /logs/server.log"]
    quiet = "\n".join(line for line in LOG.splitlines() if not line.startswith(("E", "RuntimeError", "error")))
    lines = failure_report(quiet, "x.log").splitlines()
    assert lines[0] == "no error in the log; its last lines:" and lines[-1] == "log: x.log"
    assert lines[-2] == '  I1207 15:46:40.803787 10599 server.cc:345] "Timeout 5: Found 1 live models and 0 ' \
                        'in-flight non-inference requests"'
    assert not [line for line in lines if "NVML" in line or "DCGM" in line or line.startswith("  +")]


def test_a_models_stop_verdict_is_the_failure_reason(tmp_path):
    """A request in flight when a rank died logs gloo's error first; the runtime's verdict names the rank."""
    log = tmp_path / "server.log"
    log.write_text(LOG)
    assert TritonServer(tmp_path, log_path=log).failure_reason() == \
        "tensorrt_llm (reference): rank 1 exited with code -9; stopping the server"
    log.write_text("\n".join(line for line in LOG.splitlines() if "stopping the server" not in line))
    assert TritonServer(tmp_path, log_path=log).failure_reason().startswith("RuntimeError: [/__w/pytorch/")


@pytest.fixture
def listener(tmp_path):
    """A listening socket held by another process, as a stale server would hold it."""
    script = tmp_path / "listen.py"
    script.write_text("import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
                      "print(s.getsockname()[1], flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        yield f"pid {proc.pid} ({sys.executable} {script})", int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def test_a_taken_port_is_refused_before_starting_naming_its_holder(listener, tmp_path):
    holder, port = listener
    assert port_taken("127.0.0.1", port) and port_taken("0.0.0.0", port)
    assert port_holder(port) == holder
    ep = free_endpoints()
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo, type(ep)(ep.http_port, port, ep.metrics_port), log_path=tmp_path / "server.log")
    with pytest.raises(PortInUse) as e:
        server.start()
    assert str(e.value) == f"gRPC port {port} on 127.0.0.1 is in use by {holder}: stop that process or choose " \
                           "another port"
    assert server.proc is None and not (tmp_path / "server.log").exists()  # nothing was started


def test_a_free_port_is_not_taken():
    ep = free_endpoints()
    assert not port_taken("127.0.0.1", ep.http_port)
    assert port_holder(ep.http_port) == "no process this user can see"


def test_free_ports_are_picked_below_the_ephemeral_range():
    """A port the kernel hands out for a bind to port 0 (a rank's rendezvous in another test worker, say) can
    be taken between the pick and the server's bind ("gRPC port ... is in use by pid N (spawn_main)")."""
    from enginesmith.triton_repo.ports import LOWEST_PICKED_PORT, _ephemeral_ports

    low = _ephemeral_ports()[0]
    ports = {free_port() for _ in range(50)}
    assert all(LOWEST_PICKED_PORT <= p < low for p in ports) and len(ports) > 40, sorted(ports)


HUNG = "tensorrt_llm (reference): rank 1 sent no heartbeat in 20 s (hung, or its node is gone); stopping the server"
RANK_HUNG = f'E1207 19:51:36.046296 25468 model.py:376] "{HUNG}"'


@pytest.mark.parametrize("stopping", [True, False])
def test_a_stub_that_ends_with_a_stopping_server_is_not_blamed(tmp_path, monkeypatch, stopping):
    """A model that stops the server (a reference runtime whose rank hung) makes Triton unload the other models
    while it waits out its exit timeout; `serve` then blamed the first stub that ended ("the Python-backend stub
    of model 'tensorrt_llm_bls' died ...") instead of the rank the log names. Without a stop, a dead stub is one."""
    log = tmp_path / "server.log"
    log.write_text(f"{RANK_HUNG}\nSignal (15) received.\n" if stopping else f"{RANK_HUNG}\n")
    assert stop_signalled(log.read_text()) == stopping
    server = TritonServer(tmp_path, log_path=log)
    stub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    server.proc = fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the server
    monkeypatch.setattr(server, "stubs", lambda: {stub.pid: "tensorrt_llm_bls"})
    stub.kill()
    stub.wait()
    exits = threading.Timer(1.0, fake.terminate)  # the server outlives the stub a while, then exits
    exits.start()
    try:
        result = server.watch(poll_s=0.05)
    finally:
        exits.cancel()
        fake.kill()
        fake.wait()
    if stopping:
        assert result is None  # `serve` reports the exit: the reason below
        assert server.failure_reason() == HUNG
    else:
        assert result == (f"the Python-backend stub of model 'tensorrt_llm_bls' (pid {stub.pid}) died; Triton would "
                          f"keep reporting ready while requests to it fail: {HUNG}")


def test_a_server_that_hangs_after_its_stop_is_killed(tmp_path):
    """A model stopped the server (its rank died), Triton logged the stop and then hung past its own exit timeout
    (2.51 can, after "Exit timeout expired. Exiting immediately."): `serve` must not wait for ever."""
    log = tmp_path / "server.log"
    log.write_text("I1207 server.cc:2598] ready\n")
    server = TritonServer(tmp_path, log_path=log, exit_timeout_s=1, stop_timeout_s=1)
    server.proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                    "signal.SIG_IGN); time.sleep(120)"], start_new_session=True)
    server._ready_at = log.stat().st_size
    threading.Timer(0.5, lambda: log.write_text(log.read_text() + f"{RANK_HUNG}\nSignal (15) received.\n")).start()
    t = time.monotonic()
    assert server.watch(poll_s=0.05) is None
    assert time.monotonic() - t < 30 and server.proc.returncode == -signal.SIGKILL
    assert server.failure_reason() == HUNG
