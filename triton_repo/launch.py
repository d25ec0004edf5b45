"""The tritonserver command lines, as pure functions returning argv lists (nothing is started here).

One process serves a single-rank model. A multi-rank TensorRT-LLM engine runs in leader mode: one MPI rank
per GPU (world size = tp_size * pp_size), all ranks launched by one MPMD `mpirun`: a `-n 1 tritonserver ...`
block per rank, separated by ':'. Rank 0 loads every model and serves; ranks > 0 load only tensorrt_llm in
explicit mode and block inside its initialization as TensorRT-LLM workers, so giving them the same ports
does not collide. Each rank gets its own Python-backend shared-memory prefix (`prefix{i}_`), as upstream's
scripts/launch_triton_server.py does (without its duplicated port flags).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the server listens."""

    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    http_address: str = "127.0.0.1"
    grpc_address: str = "127.0.0.1"
    metrics_address: str = "127.0.0.1"
    shm_header: tuple[str, str] | None = None
    """(header, secret): Triton's shared-memory registration API only for requests carrying `header: secret`
    (`--grpc-restricted-protocol` / `--http-restricted-api`), so remote clients cannot register the
    Python backend's own IPC regions; set when an endpoint listens beyond loopback."""

    def __post_init__(self) -> None:
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise ValueError(f"http/grpc/metrics ports {ports} must be three distinct ports in 1..65535")

    def args(self) -> list[str]:
        args = [f"--http-address={self.http_address}", f"--http-port={self.http_port}",
                f"--grpc-address={self.grpc_address}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.metrics_address}", f"--metrics-port={self.metrics_port}"]
        if self.shm_header is not None:
            key, value = self.shm_header
            args += [f"--grpc-restricted-protocol=shared-memory:{key}={value}",
                     f"--http-restricted-api=shared-memory:{key}={value}"]  # tritonserver 2.51's HTTP spelling
        return args


def server_args(model_repository: str | Path, endpoints: Endpoints, *, backend_dir: str | Path | None = None,
                exit_timeout_s: int | None = None, log_file: str | Path | None = None, log_verbose: int = 0,
                extra: tuple[str, ...] = ()) -> list[str]:
    """Flags of one tritonserver serving every model of the repository."""
    args = [f"--model-repository={model_repository}", *endpoints.args(), "--disable-auto-complete-config"]
    if backend_dir is not None:
        args.append(f"--backend-directory={backend_dir}")
    if exit_timeout_s is not None:
        args.append(f"--exit-timeout-secs={exit_timeout_s}")
    if log_file is not None:
        args += [f"--log-verbose={log_verbose}", f"--log-file={log_file}"]
    return [*args, *extra]


def build_server_argv(tritonserver: str | Path, model_repository: str | Path, endpoints: Endpoints,
                      **kwargs) -> list[str]:
    """`tritonserver ...` for a single-rank deployment (kwargs: see `server_args`)."""
    return [str(tritonserver), *server_args(model_repository, endpoints, **kwargs)]


def build_mpirun_argv(world_size: int, tritonserver: str | Path, model_repository: str | Path,
                      endpoints: Endpoints, *, tensorrt_llm_models: tuple[str, ...] = ("tensorrt_llm",),
                      hosts: tuple[str, ...] = (), slots_per_host: int | None = None,
                      hostfile: str | Path | None = None, env_vars: tuple[str, ...] = (),
                      backend_dir: str | Path | None = None, exit_timeout_s: int | None = None,
                      log_file: str | Path | None = None, oversubscribe: bool = False,
                      mpirun: str = "mpirun", allow_run_as_root: bool = True) -> list[str]:
    """The leader-mode MPMD `mpirun` command of a multi-rank TensorRT-LLM deployment.

    `hosts` (with `slots_per_host`, e.g. GPUs per node) or `hostfile` place ranks on several nodes;
    `env_vars` are exported to every rank (`-x NAME`).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if hosts and hostfile is not None:
        raise ValueError("give hosts or hostfile, not both")
    if not tensorrt_llm_models:
        raise ValueError("tensorrt_llm_models must name the model(s) ranks > 0 load")
    argv = [mpirun]
    if allow_run_as_root:
        argv.append("--allow-run-as-root")
    if oversubscribe:
        argv.append("--oversubscribe")
    if hostfile is not None:
        argv += ["--hostfile", str(hostfile)]
    elif hosts:
        argv += ["-H", ",".join(f"{h}:{slots_per_host}" if slots_per_host else h for h in hosts)]
    for name in env_vars:
        argv += ["-x", name]
    for rank in range(world_size):
        if rank:
            argv.append(":")
        extra = ("--model-control-mode=explicit", *(f"--load-model={m}" for m in tensorrt_llm_models)) if rank \
            else ()
        args = server_args(model_repository, endpoints, backend_dir=backend_dir, exit_timeout_s=exit_timeout_s,
                           log_file=log_file if rank == 0 else None, extra=extra)
        argv += ["-n", "1", str(tritonserver), *args,
                 f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
    return argv
