"""`enginesmith build RECIPE`: converted checkpoint -> engines / LLM-API YAML / reference engine dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from enginesmith.builders.build.flags import shell_line
from enginesmith.builders.build.stage import StageDirs
from enginesmith.builders.build.trtllm_engine import runner_argv

console = Console(highlight=False, soft_wrap=True, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

# Exit codes: 1 bad input/checkpoint/engine, 3 TensorRT-LLM missing (commands were printed), 4 tool failed.
EXIT_BAD_INPUT, EXIT_NO_TRTLLM, EXIT_TOOL_FAILED = 1, 3, 4
OUT = Path("out")


def _load(recipe_path: Path):
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    return recipe, make_plan(recipe)


def _explain(choices) -> None:
    console.print("# trtllm-build choices (flag, value, why):")
    width = max(len(c.flag) for c in choices)
    for c in choices:
        value = c.value if c.emitted else "(left out)"
        console.print(f"#   {c.flag:<{width}}  {value:<10}  {c.reason}")


def _trtllm_found() -> str:
    """The TensorRT-LLM this Python would run (the installed version, never the pin)."""
    import shutil

    from enginesmith.builders.build.engine_check import installed_trtllm_version, trtllm_location
    from enginesmith.builders.build.trtllm_engine import PINNED_VERSION

    found = installed_trtllm_version()
    if found is None:
        return f"TensorRT-LLM: not installed for {sys.executable} (the engine target is pinned to {PINNED_VERSION})"
    tool = shutil.which("trtllm-build") or "no trtllm-build on PATH"
    pin = "" if found == PINNED_VERSION else f"; the engine target is pinned to {PINNED_VERSION}"
    return f"TensorRT-LLM {found} found ({trtllm_location()}; {tool}){pin}"


def _show_nodes(recipe_path: Path, out: Path, per_node) -> None:
    """What to run where when the engine ranks span nodes: shared filesystem, or a directory per node."""
    es = f"enginesmith {{}} {recipe_path}" + ("" if out == OUT else f" --out {out}")
    console.print(f"# {len(per_node)} nodes: mpirun starts every rank with the same paths, so --out must be at the "
                  "same path on every node.")
    console.print(f"#   shared filesystem: node 0 runs convert, build and repo for all ranks "
                  f"(`{es.format('build')}` runs the line above)")
    console.print("#   a directory per node: each node runs, in a directory at that same path:")
    for cmd in per_node:
        rs = ",".join(map(str, cmd.ranks))
        steps = " && ".join(f"{es.format(step)} --ranks {rs}" for step in ("convert", "build", "repo"))
        console.print(f"#     node {cmd.node}: {steps}")
        console.print(f"#       (build runs: {shell_line(runner_argv(cmd))})")
    console.print(f"#   then on node 0: {es.format('serve')} --hosts NODE0,NODE1,...  (add --ranks "
                  f"{','.join(map(str, per_node[0].ranks))} with per-node directories)")


def _show_engine_plan(recipe, plan, recipe_path: Path, dirs: StageDirs, ranks, workers, explain: bool):
    from enginesmith.builders.build.engine_target import plan_engine_build
    from enginesmith.builders.planner.layout_search import layout_sizes

    bp = plan_engine_build(recipe, plan, dirs.checkpoint, dirs.engine, ranks, workers)
    m = plan.mapping
    console.print(f"# {recipe.name}: target trtllm-engine (TensorRT-LLM 1.2.x) for {bp.gpu.label}; "
                  f"{layout_sizes(m, plan.spec.is_moe)} over {len({c.node for c in m.ranks()})} node(s)")
    console.print(f"# {_trtllm_found()}")
    state = "present" if (dirs.checkpoint / "manifest.json").is_file() else \
        f"not converted yet: `enginesmith convert {recipe_path}` writes it"
    console.print(f"# checkpoint: {dirs.checkpoint} ({state})")
    console.print(f"# engines:    {dirs.engine}")
    if explain:
        _explain(bp.choices)
    console.print(shell_line(runner_argv(bp.command)))
    if bp.per_node and ranks is None:
        _show_nodes(recipe_path, dirs.root.parent, bp.per_node)


def _show_llmapi(recipe, plan, dirs: StageDirs) -> None:
    from enginesmith.builders.build.flags import shell_line
    from enginesmith.builders.build.llmapi import OPTIONS_FILE, llmapi_files, model_source, serve_command

    for name, text in llmapi_files(recipe, plan, dirs.hf).items():
        console.print(f"# ---- {dirs.engine / name}")
        console.print(text, end="")
    model = model_source(recipe, dirs.hf)
    console.print(f"# serve with TensorRT-LLM's own server ({OPTIONS_FILE}):")
    console.print(shell_line(serve_command(recipe, model, dirs.engine)))


def _show_reference(recipe, plan, dirs: StageDirs) -> None:
    from enginesmith.builders.build.reference import ENGINE_CONFIG, reference_engine_config

    console.print(f"# checkpoint: {dirs.checkpoint}; would write {dirs.engine / ENGINE_CONFIG}:")
    console.print(json.dumps(reference_engine_config(recipe, dirs.checkpoint, plan.pipeline.micro_batches), indent=2))


def _fail(code: int, message: str):
    err_console.print(f"error: {message}")
    raise typer.Exit(code)


def build(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML.")],
    out: Annotated[Path, typer.Option("--out", help="Working directory root (<out>/<recipe.name>/...).")] = OUT,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the exact commands/files; build nothing.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Show every build choice with its reason.")] = False,
    ranks: Annotated[str | None, typer.Option(
        "--ranks", help="Engine ranks to build on this node, e.g. 0,1 or 4-7 (default: all).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Parallel build workers (default: GPUs of one node that the ranks use).")] = None,
) -> None:
    """Build the recipe's target from its converted checkpoint (cached: an unchanged build is skipped)."""
    from enginesmith.builders.build.checkpoint import CheckpointError
    from enginesmith.builders.build.engine_check import EngineCheckError
    from enginesmith.builders.build.engine_target import GpuMismatchError
    from enginesmith.builders.build.flags import parse_ranks
    from enginesmith.builders.build.stage import run_build_stage
    from enginesmith.builders.build.trtllm_engine import TensorRTLLMUnavailable

    try:
        recipe, plan = _load(recipe_path)
        rank_sel = parse_ranks(ranks, plan.mapping.world_size)
        dirs = StageDirs.of(out, recipe.name)
        target = recipe.build.target
        if target != "trtllm-engine" and (ranks or workers):
            raise ValueError(f"--ranks/--workers apply to build.target trtllm-engine only, not {target}")
        if target == "trtllm-engine":
            _show_engine_plan(recipe, plan, recipe_path, dirs, rank_sel, workers, explain)
        elif dry_run or explain:
            _show_llmapi(recipe, plan, dirs) if target == "trtllm-llmapi" else _show_reference(recipe, plan, dirs)
        if dry_run:
            return
        result = run_build_stage(recipe, plan, out, rank_sel, workers)
    except TensorRTLLMUnavailable as e:
        _fail(EXIT_NO_TRTLLM, str(e))
    except (ValueError, CheckpointError, GpuMismatchError, EngineCheckError) as e:
        _fail(EXIT_BAD_INPUT, str(e))
    except subprocess.CalledProcessError as e:
        _fail(EXIT_TOOL_FAILED, f"{e.cmd[0]} failed with exit code {e.returncode}")
    except OSError as e:
        from enginesmith.builders.cli.errors import fs_error

        _fail(EXIT_BAD_INPUT, fs_error(e, "--out", out))
    if result.skipped:
        console.print(f"{target}: up to date in {result.engine_dir} (cache key unchanged); nothing to do")
    else:
        console.print(f"{target}: built {', '.join(result.built)} in {result.engine_dir} "
                      f"(changed: {', '.join(result.changed)})")


def register(app: typer.Typer) -> None:
    app.command("build")(build)
