"""`enginesmith repo RECIPE` (write the Triton model repository) and `enginesmith serve RECIPE` (run it)."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
OUT = Path("out")
EXIT_BAD_INPUT, EXIT_SERVER_FAILED = 1, 2

RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Working directory root (<out>/<recipe.name>/...).")]
LlmapiOpt = Annotated[Path | None, typer.Option(
    "--llmapi-model-py", help="trtllm-llmapi: TensorRT-LLM's triton_backend/all_models/llmapi/tensorrt_llm/1/"
                              "model.py, copied into the repository.")]


def _fail(code: int, message: str):
    err_console.print(f"error: {message}")
    raise typer.Exit(code)


def _write(recipe_path: Path, out: Path, llmapi_model_py: Path | None):
    from builders.plan import make_plan
    from builders.recipe import load_recipe
    from triton_repo.repository import write_repo

    recipe = load_recipe(recipe_path)
    plan = make_plan(recipe, with_options=False)
    root = out / recipe.name
    manifest = write_repo(recipe, plan, root / "engine", root / "checkpoint" / "tokenizer", root / "repo",
                          llmapi_model_py=llmapi_model_py)
    return recipe, root / "repo", manifest


def repo(recipe_path: RecipeArg, out: OutOpt = OUT, llmapi_model_py: LlmapiOpt = None) -> None:
    """Write the Triton model repository (ensemble, pre/postprocessing, tensorrt_llm, BLS) of a built recipe."""
    from triton_repo.repo_checks import RepoError

    try:
        _, repo_dir, manifest = _write(recipe_path, out, llmapi_model_py)
    except (RepoError, ValueError) as e:
        _fail(EXIT_BAD_INPUT, str(e))
    console.print(f"repo: {repo_dir} ({manifest.target}; models {', '.join(manifest.models)}; "
                  f"tensorrt_llm backend {manifest.tensorrt_llm_backend}; world_size {manifest.world_size})")
    for warning in manifest.warnings:
        err_console.print(f"warning: {warning}")


class _Stop(Exception):
    """SIGTERM received: stop the server gracefully."""


def _on_sigterm(signum, frame):
    raise _Stop()


def _server(recipe, repo_dir: Path, ranks: int, public: bool, http_address, grpc_address, hosts, hostfile,
            ready_timeout: float):
    from triton_repo.launch import Endpoints
    from triton_repo.server import TritonServer

    s = recipe.serve
    default = "0.0.0.0" if public else s.bind_address
    endpoints = Endpoints(s.http_port, s.grpc_port, s.metrics_port, http_address or default,
                          grpc_address or default, default)
    nodes = -(-ranks // recipe.hardware.gpus_per_node)  # leader mode: ranks fill the nodes in order
    if nodes > 1 and not (hosts or hostfile):
        raise ValueError(f"the layout spans {nodes} nodes: give --hosts node0,node1,... or --hostfile FILE")
    return TritonServer(repo_dir, endpoints, world_size=ranks, ready_timeout_s=ready_timeout,
                        log_path=repo_dir.parent / "tritonserver.log", hosts=tuple(hosts.split(",")) if hosts else (),
                        slots_per_host=recipe.hardware.gpus_per_node if hosts else None, hostfile=hostfile)


def _print_command(recipe_path: Path, out: Path, server_args: dict) -> None:
    """The command `serve` would run (works without an engine: the layout comes from the plan)."""
    from builders.plan import make_plan
    from builders.recipe import load_recipe

    from triton_repo.repository import launch_ranks

    recipe = load_recipe(recipe_path)
    ranks = launch_ranks(recipe.build.target, make_plan(recipe, with_options=False).mapping)
    server = _server(recipe, out / recipe.name / "repo", ranks, **server_args)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in server.binary_env().items())
    console.print(f"{env} {shlex.join(server.argv(dry=True))}")


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
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", help="Seconds to wait for readiness.")] = 300.0,
    llmapi_model_py: LlmapiOpt = None,
    openai_port: Annotated[int | None, typer.Option(
        "--openai-port", help="Also serve the OpenAI API (/v1/...) on this port (127.0.0.1 unless --public).")] = None,
) -> None:
    """Serve a recipe's repository with tritonserver until Ctrl-C / SIGTERM (then stop it gracefully)."""
    from triton_repo.repo_checks import RepoError
    from triton_repo.server import ServerError, ServerNotFound

    server_args = dict(public=public, http_address=http_address, grpc_address=grpc_address, hosts=hosts,
                       hostfile=hostfile, ready_timeout=ready_timeout)
    try:
        if print_command:
            return _print_command(recipe_path, out, server_args)
        recipe, repo_dir, manifest = _write(recipe_path, out, llmapi_model_py)
        server = _server(recipe, repo_dir, manifest.launch_ranks, **server_args)
    except (RepoError, ValueError, ServerNotFound, ServerError) as e:
        _fail(EXIT_BAD_INPUT, str(e))
    from builders.commands_openai import start_for_serve, stop_for_serve

    previous, front = signal.signal(signal.SIGTERM, _on_sigterm), None
    try:
        server.start()
        front = start_for_serve(recipe, out, server.grpc_url, openai_port, public)
        console.print(f"serving {repo_dir} ({', '.join(manifest.models)}): HTTP {server.http_url}, "
                      f"gRPC {server.grpc_url}, metrics {server.metrics_url}; log {server.log_path}")
        console.print("Ctrl-C or SIGTERM stops the server")
        code = server.wait()
        _fail(EXIT_SERVER_FAILED, f"tritonserver exited with code {code}; last log lines:\n{server.log_tail()}")
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
