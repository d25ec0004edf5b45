"""`enginesmith demo`: serve a built recipe's repository and stream one request through the ensemble.

The last step of `make demo` (plan -> convert -> build -> repo come before it): start tritonserver on
free 127.0.0.1 ports, stream one prompt over gRPC and print the text as it arrives, report the
timings, then stop the server (gracefully, with no process left behind).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(markup=False)  # the prompt, generated text and paths are printed as they are


def demo(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE",
                                                  help="A recipe already converted, built and written as a repo.")],
    out: Annotated[Path, typer.Option(help="Working directory root (<out>/<recipe.name>/...).")] = Path("out"),
    prompt: Annotated[str, typer.Option(help="The prompt to stream.")] = "Once upon a time there was",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 24,
    model: Annotated[str, typer.Option(help="ensemble | tensorrt_llm_bls")] = "ensemble",
) -> None:
    """Serve the recipe's repository, stream one request through it, stop the server."""
    from enginesmith.builders.recipe import load_recipe
    from enginesmith.client.grpc_stream import GrpcStreamClient
    from enginesmith.client.params import GenerateParams
    from enginesmith.triton_repo.server import TritonServer

    recipe = load_recipe(recipe_path)
    repo_dir = out / recipe.name / "repo"
    if not (repo_dir / "manifest.json").is_file():
        console.print(f"{repo_dir} has no manifest.json: run `enginesmith repo {recipe_path}` first", style="red")
        raise typer.Exit(2)
    t0 = time.monotonic()
    with TritonServer(repo_dir, log_path=out / recipe.name / "demo-server.log") as server:
        console.print(f"tritonserver ready in {time.monotonic() - t0:.1f} s: gRPC {server.grpc_url}, "
                      f"HTTP {server.http_url}", style="dim")
        console.print(prompt, style="bold", end="")
        with GrpcStreamClient(server.grpc_url, model=model) as client:
            result = client.generate(GenerateParams(text=prompt, max_tokens=max_tokens, stream=True,
                                                    request_id="demo-1"),
                                     on_chunk=lambda chunk, _res: console.print(chunk.text, end="", soft_wrap=True))
        console.print()
    chunks = [c for c in result.chunks if c.text]
    if not chunks:
        console.print("the stream carried no text", style="red")
        raise typer.Exit(1)
    ttft_ms = (chunks[0].t_ns - result.send_ns) / 1e6
    e2e_ms = (result.done_ns - result.send_ns) / 1e6
    console.print(f"streamed {len(chunks)} chunks through `{model}`: TTFT {ttft_ms:.1f} ms, "
                  f"end to end {e2e_ms:.1f} ms; server stopped", style="green")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
