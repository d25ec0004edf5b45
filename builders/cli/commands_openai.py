"""`enginesmith openai RECIPE` (the OpenAI-compatible front over a running Triton deployment), and the hook
`enginesmith serve RECIPE --openai-port N` uses to start the same front beside tritonserver."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

# No markup: paths, server errors and URLs are printed as they are.
console = Console(highlight=False, soft_wrap=True, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
EXIT_BAD_INPUT, EXIT_UNREACHABLE = 1, 2
DEFAULT_PORT = 8003


class _Stop(Exception):
    """SIGTERM received."""


def _on_sigterm(signum, frame):
    raise _Stop()


def _fail(code: int, message: str):
    err_console.print(f"error: {message}")
    raise typer.Exit(code)


def front_config(recipe: Any, out: Path, triton_grpc: str | None = None, triton_model: str = "tensorrt_llm",
                 tokenizer: Path | None = None):
    """The front of `recipe`: its name, its engine limits, its tokenizer, its Triton gRPC endpoint."""
    from enginesmith.client.target import recipe_tokenizer
    from enginesmith.triton_repo.openai_api.app import FrontConfig
    from enginesmith.triton_repo.openai_api.prompts import Limits

    tok = tokenizer or recipe_tokenizer(recipe, out)
    if tok is None or not Path(tok).is_dir():
        raise ValueError(f"no tokenizer for {recipe.name!r} under {out / recipe.name}: pass --tokenizer DIR "
                         "(the model's Hugging Face tokenizer folder)")
    bind = recipe.serve.bind_address
    host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
    return FrontConfig(recipe.name, triton_grpc or f"{host}:{recipe.serve.grpc_port}", Path(tok),
                       Limits(recipe.build.max_input_len, recipe.build.max_seq_len), triton_model)


def start_for_serve(recipe: Any, out: Path, grpc_url: str, port: int | None, public: bool):
    """The `serve --openai-port` hook: the front in a thread of the serve process (None without a port).
    Failures are ServerError, which `serve` reports like a server that did not start."""
    if port is None:
        return None
    from enginesmith.triton_repo.server import ServerError

    try:
        from enginesmith.triton_repo.openai_api.app import create_app
        from enginesmith.triton_repo.openai_api.runner import FrontError, FrontServer

        cfg = front_config(recipe, out, grpc_url)
        front = FrontServer(create_app(cfg), "0.0.0.0" if public else "127.0.0.1", port).start()
    except ImportError as e:
        raise ServerError(f"--openai-port needs the serve extra (starlette, uvicorn): {e}") from None
    except (FrontError, ValueError) as e:
        raise ServerError(str(e)) from None
    console.print(f"OpenAI API: {front.url} (model {cfg.model_name!r})")
    return front


def stop_for_serve(front) -> None:
    if front is not None:
        front.stop()


def openai(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML (model name, limits, tokenizer).")],
    out: Annotated[Path, typer.Option("--out", help="Working directory root (<out>/<recipe.name>/...).")] = Path("out"),
    triton_grpc: Annotated[str | None, typer.Option(
        "--triton-grpc", help="Triton's gRPC host:port (default: the recipe's serve.grpc_port).")] = None,
    triton_model: Annotated[str, typer.Option(
        "--triton-model", help="tensorrt_llm (token ids; the front tokenizes) or ensemble (text).")] = "tensorrt_llm",
    port: Annotated[int, typer.Option("--port", help="HTTP port of the OpenAI API.")] = DEFAULT_PORT,
    public: Annotated[bool, typer.Option("--public", help="Listen on every interface (0.0.0.0).")] = False,
    tokenizer: Annotated[Path | None, typer.Option(
        "--tokenizer", help="HF tokenizer dir (default: the recipe's checkpoint/tokenizer).")] = None,
) -> None:
    """Serve the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions) in front of a running
    Triton deployment of RECIPE, until Ctrl-C / SIGTERM."""
    from enginesmith.builders.recipe import load_recipe
    from enginesmith.client.model_info import grpc_model_info
    from enginesmith.client.params import ClientError, ServerUnreachable

    try:
        recipe = load_recipe(recipe_path, check_model=False)
        cfg = front_config(recipe, out, triton_grpc, triton_model, tokenizer)
    except ValueError as e:
        _fail(EXIT_BAD_INPUT, str(e))
    try:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(cfg.triton_grpc_url) as c:
            grpc_model_info(c, cfg.triton_model)
    except (ClientError, ServerUnreachable) as e:
        _fail(EXIT_UNREACHABLE, f"Triton at {cfg.triton_grpc_url}: {e}; is it running? "
                                f"(`enginesmith serve {recipe_path}`)")
    from enginesmith.triton_repo.openai_api.app import create_app
    from enginesmith.triton_repo.openai_api.runner import FrontError, FrontServer

    try:
        front = FrontServer(create_app(cfg), "0.0.0.0" if public else "127.0.0.1", port).start()
    except (FrontError, ClientError) as e:
        _fail(EXIT_UNREACHABLE, str(e))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        console.print(f"OpenAI API: {front.url} (model {cfg.model_name!r}, Triton {cfg.triton_grpc_url} "
                      f"{cfg.triton_model!r}); Ctrl-C or SIGTERM stops it")
        while front.thread.is_alive():
            front.thread.join(0.5)
        _fail(EXIT_UNREACHABLE, "the OpenAI front stopped unexpectedly")
    except (KeyboardInterrupt, _Stop):
        console.print("stopping the OpenAI front ...")
    finally:
        front.stop()
        signal.signal(signal.SIGTERM, previous)
    console.print("OpenAI front stopped")


def register(app: typer.Typer) -> None:
    app.command("openai")(openai)
