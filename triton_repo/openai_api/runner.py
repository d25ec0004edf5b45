"""Run the front: uvicorn in a background thread of this process (`enginesmith serve --openai-port`,
`enginesmith openai`), or `enginesmith openai` as a child process (the bench, the benchmarks), so the load
generator does not share an interpreter with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from starlette.applications import Starlette

from enginesmith.triton_repo.discovery import IMPORT_ROOT


class FrontError(RuntimeError):
    """The front could not start."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn, so a taken port is a clear error here (port 0: any free port). Its protocol
    is IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on such sockets' connections, and with it
    on a kept-alive connection waits ~40 ms (delayed ACK) between a response's headers and its body."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FrontError(f"the OpenAI front cannot listen on {host}:{port}: {e.strerror}; pick another port") from None
    return sock


class FrontServer:
    """uvicorn serving `app` from a daemon thread; `start()` returns once it accepts connections."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 8003):
        import uvicorn

        self.app, self.host = app, host
        self.sock = listen_socket(host, port)
        self.port = self.sock.getsockname()[1]
        # asyncio's own loop: the one grpc.aio (the Triton client) is made for
        self.server = uvicorn.Server(uvicorn.Config(app, loop="asyncio", log_level="warning", access_log=False,
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"http://{host}:{self.port}/v1"

    def start(self, timeout_s: float = 60.0) -> FrontServer:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="openai-front")
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                why = getattr(self.app.state, "startup_error", None) or "see the log above"
                self.stop()
                raise FrontError(f"the OpenAI front did not start on {self.host}:{self.port}: {why}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=15)
        self.sock.close()


class FrontProcess:
    """`enginesmith openai RECIPE ...` as a child process, ready once `/health` answers 200. Port 0: a free
    port, tried again on a fresh one if another process takes it first."""

    def __init__(self, recipe: str | Path, port: int = 0, *, out: str | Path = "out", triton_grpc: str | None = None,
                 triton_model: str = "tensorrt_llm", tokenizer: str | Path | None = None,
                 log_path: str | Path | None = None):
        self.requested_port = self.port = port
        self.args = ["openai", str(recipe), "--out", str(out), "--triton-model", triton_model]
        if triton_grpc:
            self.args += ["--triton-grpc", triton_grpc]
        if tokenizer:
            self.args += ["--tokenizer", str(tokenizer)]
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="enginesmith-openai-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 120.0) -> FrontProcess:
        from enginesmith.triton_repo.ports import free_port

        for attempt in range(1 if self.requested_port else 3):
            self.port = self.requested_port or free_port()
            self._spawn()
            try:
                self._wait_ready(timeout_s)
                return self
            except FrontError:
                self.stop()
                if attempt < 2 and not self.requested_port and "cannot listen" in self.log_tail():
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        root = IMPORT_ROOT  # the checkout root, or where enginesmith is installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        argv = [sys.executable, "-m", "enginesmith.builders.cli", *self.args, "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=root, env=env)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FrontError(f"`enginesmith {' '.join(self.args)}` exited with code {self.proc.returncode}; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise FrontError(f"the OpenAI front on port {self.port} was not ready after {timeout_s:.0f}s; log "
                         f"{self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> FrontProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
