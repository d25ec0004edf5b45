"""`enginesmith repo RECIPE` (write the Triton model repository) and `enginesmith serve RECIPE` (run it)."""

from __future__ import annotations

import ipaddress
import secrets
import shlex
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from enginesmith.builders.cli.errors import fs_error

# No markup: paths, server logs and gloo messages carry `[...]` of their own.
console = Console(highlight=False, soft_wrap=True, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
OUT = Path("out")
EXIT_BAD_INPUT, EXIT_SERVER_FAILED = 1, 2

RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Working directory root (<out>/<recipe.name>/...).")]
LlmapiOpt = Annotated[Path | None, typer.Option(
    "--llmapi-model-py", help="trtllm-llmapi: TensorRT-LLM's triton_backend/all_models/llmapi/tensorrt_llm/1/"
                              "model.py, copied into the repository.")]
RanksOpt = Annotated[str | None, typer.Option(
    "--ranks", help="trtllm-engine over several nodes without a shared filesystem: the engine ranks this node "
                    "holds, e.g. 2,3 (default: all ranks are here).")]


def _fail(code: int, message: str):
    err_console.print(f"error: {message}")
    raise typer.Exit(code)


def _load(recipe_path: Path):
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    return recipe, make_plan(recipe, with_options=False)


def _write(recipe, plan, out: Path, llmapi_model_py: Path | None, ranks: str | None):
    from enginesmith.builders.build.flags import parse_ranks
    from enginesmith.triton_repo.repository import write_repo

    root = out / recipe.name
    manifest = write_repo(recipe, plan, root / "engine", root / "checkpoint" / "tokenizer", root / "repo",
                          llmapi_model_py=llmapi_model_py, ranks=parse_ranks(ranks, plan.mapping.world_size))
    return root / "repo", manifest


def _where(plan, repo_dir: Path, manifest) -> str | None:
    """How the other nodes' ranks find their files (None: one node)."""
    nodes = len({c.node for c in plan.mapping.ranks()})
    if nodes == 1 or manifest.launch_ranks == 1:
        return None
    if manifest.ranks:
        here = ",".join(map(str, manifest.ranks))
        return (f"{nodes} nodes, per-node directories: this node holds ranks {here}; mpirun starts the others with "
                f"the same paths ({repo_dir.resolve()}, {manifest.engine_dir}), so each node must have run "
                "`enginesmith convert/build/repo RECIPE --ranks <its ranks>` in a directory at that same path")
    return (f"{nodes} nodes, shared filesystem: all {manifest.world_size} engine ranks are here, and every node "
            f"reads {repo_dir.resolve()} and {manifest.engine_dir} at these same paths")


def repo(recipe_path: RecipeArg, out: OutOpt = OUT, llmapi_model_py: LlmapiOpt = None, ranks: RanksOpt = None) -> None:
    """Write the Triton model repository (ensemble, pre/postprocessing, tensorrt_llm, BLS) of a built recipe."""
    from enginesmith.triton_repo.repo_checks import RepoError

    try:
        recipe, plan = _load(recipe_path)
        repo_dir, manifest = _write(recipe, plan, out, llmapi_model_py, ranks)
    except (RepoError, ValueError) as e:
        _fail(EXIT_BAD_INPUT, str(e))
    except OSError as e:
        _fail(EXIT_BAD_INPUT, fs_error(e, "--out", out))
    console.print(f"repo: {repo_dir} ({manifest.target}; models {', '.join(manifest.models)}; "
                  f"tensorrt_llm backend {manifest.tensorrt_llm_backend}; world_size {manifest.world_size})",
                  markup=False)
    if where := _where(plan, repo_dir, manifest):
        console.print(where, markup=False)
    for warning in manifest.warnings:
        err_console.print(f"warning: {warning}", markup=False)


SHM_HEADER = "enginesmith-shm-key"
"""Header that unlocks Triton's shared-memory API when the server listens beyond loopback."""


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


class _Stop(Exception):
    """SIGTERM received: stop the server gracefully."""


def _on_sigterm(signum, frame):
    raise _Stop()


def _nodes(recipe, ranks: int) -> int:
    return -(-ranks // recipe.hardware.gpus_per_node)  # leader mode: ranks fill the nodes in order


def _placeholder_hosts(nodes: int) -> str:
    return ",".join(f"<host{i}>" for i in range(nodes))


def _server(recipe, repo_dir: Path, ranks: int, public: bool, http_address, grpc_address, hosts, hostfile,
            ready_timeout: float, dry: bool = False):
    """`dry` (printing the command): a multi-node layout without hosts gets placeholders instead."""
    from enginesmith.triton_repo.launch import Endpoints
    from enginesmith.triton_repo.server import TritonServer

    s = recipe.serve
    default = "0.0.0.0" if public else s.bind_address
    http, grpc = http_address or default, grpc_address or default
    # Reachable from outside: shared-memory registration only with a secret header, so no remote client can
    # map the Python backend's IPC regions (Triton's restricted protocols).
    shm_header = None if all(_loopback(a) for a in (http, grpc)) else (SHM_HEADER, secrets.token_hex(16))
    endpoints = Endpoints(s.http_port, s.grpc_port, s.metrics_port, http, grpc, default, shm_header=shm_header)
    nodes = _nodes(recipe, ranks)
    if nodes > 1 and not (hosts or hostfile):
        if not dry:
            raise ValueError(f"the layout spans {nodes} nodes: give --hosts node0,node1,... or --hostfile FILE")
        hosts = _placeholder_hosts(nodes)
    return TritonServer(repo_dir, endpoints, world_size=ranks, ready_timeout_s=ready_timeout,
                        log_path=repo_dir.parent / "tritonserver.log", hosts=tuple(hosts.split(",")) if hosts else (),
                        slots_per_host=recipe.hardware.gpus_per_node if hosts else None, hostfile=hostfile)


def _ready_timeout(plan, given: float | None) -> float:
    from enginesmith.triton_repo.readiness import default_ready_timeout, explain

    if given is not None:
        return given
    console.print(f"readiness timeout {explain(plan.memory.weight_bytes_max)} (--ready-timeout overrides)",
                  markup=False)
    return default_ready_timeout(plan.memory.weight_bytes_max)


def _print_command(recipe_path: Path, out: Path, server_args: dict) -> None:
    """The command `serve` would run (works without an engine: the layout comes from the plan)."""
    from enginesmith.triton_repo.repository import launch_ranks

    recipe, plan = _load(recipe_path)
    ranks = launch_ranks(recipe.build.target, plan.mapping)
    args = {**server_args, "ready_timeout": server_args["ready_timeout"] or 0.0}
    server = _server(recipe, out / recipe.name / "repo", ranks, **args, dry=True)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in server.binary_env().items())
    nodes = _nodes(recipe, ranks)
    if nodes > 1:
        console.print(f"# {nodes} nodes: every rank opens {server.repo} and the engine directory at these same "
                      "paths: a shared filesystem, or per-node directories at that path (`enginesmith repo RECIPE "
                      "--ranks <its ranks>` on each node)")
    console.print(f"{env} {shlex.join(server.argv(dry=True))}")
    if nodes > 1 and not (server_args["hosts"] or server_args["hostfile"]):
        err_console.print(f"note: the layout spans {nodes} nodes; {_placeholder_hosts(nodes)} stand for their "
                          "hosts: give --hosts node0,node1,... or --hostfile FILE to fill them in")


def serve(
    recipe_path: RecipeArg,
    out: OutOpt = OUT,
    http_address: Annotated[str | None, typer.Option(
        "--http-address", help="HTTP bind address (default: the recipe's serve.bind_address, 127.0.0.1).")] = None,
    grpc_address: Annotated[str | None, typer.Option(
        "--grpc-address", help="gRPC bind address (default: the recipe's serve.bind_address).")] = None,
    public: Annotated[bool, typer.Option(
        "--public", help="Listen on every interface (0.0.0.0): reachable from the network.")] = False,
    print_command: Annotated[bool, typer.Option(
        "--print-command", help="Print the tritonserver / mpirun command and exit.")] = False,
    hosts: Annotated[str | None, typer.Option(
        "--hosts", help="Multi-node: comma-separated hosts for mpirun -H (slots = gpus_per_node).")] = None,
    hostfile: Annotated[Path | None, typer.Option("--hostfile", help="Multi-node: an MPI hostfile.")] = None,
    ready_timeout: Annotated[float | None, typer.Option(
        "--ready-timeout", help="Seconds to wait for readiness (default: from the weight bytes each rank "
                                "loads, at least 300).")] = None,
    llmapi_model_py: LlmapiOpt = None,
    ranks: RanksOpt = None,
    openai_port: Annotated[int | None, typer.Option(
        "--openai-port", help="Also serve the OpenAI API (/v1/...) on this port (127.0.0.1 unless --public).")] = None,
) -> None:
    """Serve a recipe's repository with tritonserver until Ctrl-C / SIGTERM (then stop it gracefully)."""
    from enginesmith.triton_repo.repo_checks import RepoError
    from enginesmith.triton_repo.server import PortInUse, ServerError, ServerNotFound

    server_args = dict(public=public, http_address=http_address, grpc_address=grpc_address, hosts=hosts,
                       hostfile=hostfile, ready_timeout=ready_timeout)
    try:
        if print_command:
            return _print_command(recipe_path, out, server_args)
        recipe, plan = _load(recipe_path)
        repo_dir, manifest = _write(recipe, plan, out, llmapi_model_py, ranks)
        if where := _where(plan, repo_dir, manifest):
            console.print(where, markup=False)
        server_args["ready_timeout"] = _ready_timeout(plan, ready_timeout)
        server = _server(recipe, repo_dir, manifest.launch_ranks, **server_args)
    except (RepoError, ValueError, ServerNotFound, ServerError) as e:
        _fail(EXIT_BAD_INPUT, str(e))
    except OSError as e:
        _fail(EXIT_BAD_INPUT, fs_error(e, "--out", out))
    from enginesmith.builders.cli.commands_openai import start_for_serve, stop_for_serve

    previous, front = signal.signal(signal.SIGTERM, _on_sigterm), None
    try:
        server.start()
        front = start_for_serve(recipe, out, server.grpc_url, openai_port, public)
        console.print(f"serving {repo_dir} ({', '.join(manifest.models)}): HTTP {server.http_url}, "
                      f"gRPC {server.grpc_url}, metrics {server.metrics_url}; log {server.log_path}")
        console.print("Ctrl-C or SIGTERM stops the server")
        stub_died = server.watch()
        if stub_died is not None:
            _fail(EXIT_SERVER_FAILED, f"{stub_died}; stopping the server (log {server.log_path})")
        code = server.wait()
        _fail(EXIT_SERVER_FAILED, f"tritonserver exited with code {code}: {server.failure_reason()} "
                                  f"(log {server.log_path})")
    except PortInUse as e:
        _fail(EXIT_SERVER_FAILED, f"{e} (serve.{e.kind.lower()}_port in the recipe)")
    except ServerError as e:
        _fail(EXIT_SERVER_FAILED, str(e))
    except (KeyboardInterrupt, _Stop):
        console.print("stopping tritonserver ...")
    finally:
        stop_for_serve(front)
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    console.print("tritonserver stopped")


def register(app: typer.Typer) -> None:
    app.command("repo")(repo)
    app.command("serve")(serve)
