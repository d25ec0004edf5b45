"""Run tritonserver: start, wait for readiness, stop gracefully, leave no process behind.

The binary and its environment come from `triton_repo.discovery` (on PATH, else nvidia-pytriton's).
`TritonServer` is a context manager for tests and the `serve` command. Fixed ports are checked before the
start, naming the process that holds one. The server runs in its own process group, so the Python-backend
stubs (and mpirun's ranks) are stopped with it: SIGTERM first, then SIGKILL to the group after a timeout,
then the process is reaped. On Linux it also gets SIGTERM when the process that started it dies, even by
SIGKILL (PR_SET_PDEATHSIG), so no server outlives its `serve`. That is set by a tiny interpreter that then
execs the server, never by a preexec_fn: a fork of a process whose gRPC client is running (every bench and
test that starts a server after using one) runs gRPC's fork handlers, which abort about one child in ten.
"""

from __future__ import annotations

import os
import sys
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from enginesmith.triton_repo.discovery import ServerBinary, ServerNotFound, find_server
from enginesmith.triton_repo.launch import Endpoints, build_mpirun_argv, build_server_argv
from enginesmith.triton_repo.ports import free_port, port_holder, port_taken
from enginesmith.triton_repo.server_log import failure_cause, failure_report, stop_signalled

__all__ = ["TritonServer", "ServerError", "PortInUse", "ServerNotFound", "free_endpoints", "find_server"]
ADDRESS_IN_USE = ("already in use",)  # "failed to start HTTP service: ... Socket '...' already in use"
PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """tritonserver did not become ready, or failed."""


class PortInUse(ServerError):
    """A fixed port of the server is taken (found before starting it)."""

    def __init__(self, kind: str, address: str, port: int, holder: str):
        self.kind, self.address, self.port, self.holder = kind, address, port, holder
        super().__init__(f"{kind} port {port} on {address} is in use by {holder}: stop that process or choose "
                         "another port")


def free_endpoints(address: str = "127.0.0.1") -> Endpoints:
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    http, grpc, metrics = sorted(ports)
    return Endpoints(http, grpc, metrics, address, address, address)


class TritonServer:
    """One tritonserver (or one mpirun of `world_size` ranks) serving `model_repository`."""

    def __init__(self, model_repository: str | Path, endpoints: Endpoints | None = None, *,
                 binary: ServerBinary | None = None, world_size: int = 1, log_path: str | Path | None = None,
                 ready_timeout_s: float = 180.0, stop_timeout_s: float = 15.0, exit_timeout_s: int = 5,
                 env: dict[str, str] | None = None, hosts: tuple[str, ...] = (), slots_per_host: int | None = None,
                 hostfile: str | Path | None = None):
        self.repo = Path(model_repository).resolve()
        self.auto_ports = endpoints is None
        self.endpoints = endpoints or free_endpoints()
        self.binary = binary
        self.world_size = world_size
        self.log_path = Path(log_path) if log_path else _temp_log()
        self.ready_timeout_s, self.stop_timeout_s, self.exit_timeout_s = ready_timeout_s, stop_timeout_s, exit_timeout_s
        self.extra_env = env or {}
        self.mpi_placement = dict(hosts=hosts, slots_per_host=slots_per_host, hostfile=hostfile)
        self.proc: subprocess.Popen | None = None
        self._log_start = self._ready_at = 0
        """Offsets into the log (it is appended to): where this start's lines begin, and the ready point."""
        self._scanned, self._stop_logged = 0, False
        """How far `_stopping` has read the log, and whether it found the stop signal there."""

    # ---- addresses --------------------------------------------------------------------------------------
    def _host(self, address: str) -> str:
        return "127.0.0.1" if address in ("0.0.0.0", "") else address

    @property
    def http_url(self) -> str:
        return f"http://{self._host(self.endpoints.http_address)}:{self.endpoints.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._host(self.endpoints.grpc_address)}:{self.endpoints.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._host(self.endpoints.metrics_address)}:{self.endpoints.metrics_port}/metrics"

    # ---- lifecycle ------------------------------------------------------------------------------------
    def binary_env(self) -> dict[str, str]:
        """Environment variables the server binary needs (on top of os.environ)."""
        return self._binary().env

    def _binary(self) -> ServerBinary:
        if self.binary is None:
            self.binary = find_server()
        return self.binary

    def argv(self, dry: bool = False) -> list[str]:
        """The command line (`dry`: for display; a missing mpirun is then not an error)."""
        b = self._binary()
        kw = dict(backend_dir=b.backend_dir, exit_timeout_s=self.exit_timeout_s)
        if self.world_size == 1:
            return build_server_argv(b.path, self.repo, self.endpoints, **kw)
        mpirun = shutil.which("mpirun") or ("mpirun" if dry else None)
        if mpirun is None:
            raise ServerError(f"world_size={self.world_size} needs mpirun (leader mode, one rank per GPU), "
                              "and none is on PATH; install Open MPI or run in a TensorRT-LLM container")
        return build_mpirun_argv(self.world_size, b.path, self.repo, self.endpoints, mpirun=mpirun,
                                 env_vars=tuple(sorted(b.env)), **self.mpi_placement, **kw)

    def start(self) -> TritonServer:
        """Start and wait until /v2/health/ready answers 200 (retries on fresh ports if one was taken)."""
        if not (self.repo.is_dir()):
            raise ServerError(f"model repository {self.repo} does not exist: run `enginesmith repo RECIPE`")
        self._binary()
        if not self.auto_ports:
            self.check_ports()
        for attempt in range(3 if self.auto_ports else 1):
            self._spawn()
            try:
                self.wait_ready()
                return self
            except ServerError:
                tail = self._log_text(self._log_start)
                self.stop()
                if attempt < 2 and self.auto_ports and any(s in tail for s in ADDRESS_IN_USE):
                    self.endpoints = free_endpoints(self.endpoints.http_address)
                    continue
                raise
        raise AssertionError("unreachable")

    def check_ports(self) -> None:
        """Raise PortInUse naming the first taken port and the process that listens on it."""
        e = self.endpoints
        for kind, address, port in (("HTTP", e.http_address, e.http_port), ("gRPC", e.grpc_address, e.grpc_port),
                                    ("metrics", e.metrics_address, e.metrics_port)):
            if port_taken(address, port):
                raise PortInUse(kind, address, port, port_holder(port))

    def _spawn(self) -> None:
        # Rank processes of a multi-rank reference runtime are spawned with this interpreter (the stub is no python).
        env = {**os.environ, "ENGINESMITH_PYTHON": sys.executable, **self.binary.env, **self.extra_env}
        with open(self.log_path, "ab") as log:
            self._log_start = self._ready_at = log.tell()
            self._scanned, self._stop_logged = 0, False
            self.proc = subprocess.Popen(_terminated_with_this_process(self.argv()), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(f"tritonserver exited with code {code} before it was ready: "
                                  f"{self.failure_reason()}\n{self.failure_report()}")
            if self.is_ready():
                self._ready_at = self._log_size()
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {self.ready_timeout_s:.0f}s: {self.failure_reason()}\n"
                          f"{self.failure_report()}")

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_text(self, start: int) -> str:
        """The log from byte `start` on (the file may hold earlier runs)."""
        return self._log_bytes(start).decode(errors="replace")

    def _log_bytes(self, start: int) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read()
        except OSError:
            return b""

    def failure_reason(self) -> str:
        """One line: why this run failed after it was ready (`server_log.failure_cause`), else since its start."""
        cause = failure_cause(self._log_text(self._ready_at)) or failure_cause(self._log_text(self._log_start))
        return cause or "no error in its log"

    def failure_report(self) -> str:
        """This run's errors (else its last lines), and where the whole log is."""
        return failure_report(self._log_text(self._log_start), self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        text = self._log_text(0)
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        assert self.proc is not None, "start() first"
        return self.proc.wait()

    def stubs(self) -> dict[int, str]:
        """The Python-backend stub processes under the server: pid -> model name (from the model.py they run)."""
        import psutil

        assert self.proc is not None, "start() first"
        out = {}
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return out
        for child in children:
            try:
                cmd = child.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if cmd and cmd[0].endswith("triton_python_backend_stub") and len(cmd) > 1:
                out[child.pid] = Path(cmd[1]).parent.parent.name
        return out

    def watch(self, poll_s: float = 1.0) -> str | None:
        """Block while the server serves. Returns None when it exits (see `wait`), or a one-line reason as soon as
        a Python-backend stub present at readiness has died: Triton keeps reporting ready then, while every request
        to that model fails, so a server that lost one must not go on as if healthy. A stub that ends after the
        server was told to stop (by a model whose rank died, say) is the shutdown's doing: the server's exit and
        its log then tell why. A server told to stop that is still there `exit_timeout_s + stop_timeout_s` later
        (Triton 2.51 can hang after "Exit timeout expired. Exiting immediately.") is killed with its group."""
        import psutil

        assert self.proc is not None, "start() first"
        watched, stop_seen = self.stubs(), None
        while self.proc is not None and self.proc.poll() is None:
            if stop_seen is None and self._stopping():
                stop_seen = time.monotonic()
            if stop_seen is not None and time.monotonic() - stop_seen > self.exit_timeout_s + self.stop_timeout_s:
                _kill_group(self.proc.pid)
                self.proc.wait()
                break
            for pid, model in watched.items():
                try:
                    alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    alive = False
                if not alive and self.proc is not None and self.proc.poll() is None and not self._stopping():
                    return (f"the Python-backend stub of model '{model}' (pid {pid}) died; Triton would keep "
                            f"reporting ready while requests to it fail: {self.failure_reason()}")
            time.sleep(poll_s)
        return None

    def _stopping(self) -> bool:
        """Whether the log shows a stop signal since readiness (read on from where the last call ended)."""
        if not self._stop_logged:
            start = max(self._ready_at, self._scanned - 64)  # a line cut by the previous read is read whole
            data = self._log_bytes(start)
            self._scanned, self._stop_logged = start + len(data), stop_signalled(data.decode(errors="replace"))
        return self._stop_logged

    def stop(self) -> int | None:
        """SIGTERM, wait up to stop_timeout_s, then SIGKILL the whole process group; reap. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session: the server leads its own group
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(pgid)
                proc.wait()
        _kill_group(pgid)  # stubs or ranks that outlived the server
        return proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, {int(signal.SIGTERM)})\n"
    "if os.getppid() != int(sys.argv[1]):\n"  # the parent died before prctl took effect
    "    sys.exit(1)\n"
    "try:\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n"
    "    sys.exit(f'cannot run {sys.argv[2]}: {e.strerror}')\n")


def _terminated_with_this_process(argv: list[str]) -> list[str]:
    """`argv` run so that it gets SIGTERM (a graceful stop) when the thread starting it ends, i.e. this process
    when that is the main thread: a short-lived interpreter sets PR_SET_PDEATHSIG (kept across exec) and
    execs `argv` in its place (same pid). Linux main thread only; elsewhere `argv` as it is."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return argv
    program = shutil.which(argv[0]) or argv[0]
    return [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), program, *argv[1:]]


def _temp_log() -> Path:
    fd, path = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
    os.close(fd)
    return Path(path)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
