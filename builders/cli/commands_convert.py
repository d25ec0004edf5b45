"""`enginesmith convert RECIPE` (HF checkpoint -> unified TensorRT-LLM checkpoint) and `enginesmith tiny-model`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

# No markup: paths and the errors of downloads and model files are printed as they are.
console = Console(highlight=False, soft_wrap=True, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
EXIT_BAD_INPUT = 1


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_convert(recipe_path: Path, out: Path, workers: int, allow_pickle: bool, ranks: str | None = None):
    """Recipe -> Plan -> fetch -> convert; returns (ConvertResult, checkpoint folder).

    `ranks` ("2,3" or "4-7"): write only those rank files (one node of a multi-node layout)."""
    from enginesmith.builders.build.flags import parse_ranks
    from enginesmith.builders.convert import convert
    from enginesmith.builders.download import fetch_model
    from enginesmith.builders.planner.layout_search import layout_sizes
    from enginesmith.builders.model_spec import ModelSpec
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    plan = make_plan(recipe)
    mapping = plan.mapping
    rank_sel = parse_ranks(ranks, mapping.world_size)
    root = Path(out) / recipe.name
    fetched = fetch_model(recipe.model.source, recipe.model.revision, root / "hf", allow_pickle=allow_pickle)
    spec = ModelSpec.from_pretrained_dir(fetched.path)
    console.print(f"# {recipe.name}: {spec.architecture} from {fetched.repo_id or fetched.path} "
                  f"@ {fetched.revision}; {layout_sizes(mapping, spec.is_moe)} "
                  f"dtype={recipe.model.dtype} weights={recipe.quantization.weights}")
    result = convert(
        fetched.path, root / "checkpoint", mapping, spec, recipe.model.dtype, recipe.quantization.weights,
        workers=workers, progress=True, source_id=fetched.repo_id, source_revision=fetched.revision,
        # trtllm-build quantizes float weights itself (with its GPU-specific weight preprocessing).
        prequantize=recipe.build.target != "trtllm-engine", plan=plan.to_dict(), ranks=rank_sel,
    )
    return result, root / "checkpoint"


def show_convert(recipe_path: Path, out: Path, ranks: str | None) -> None:
    """What `convert` would fetch and write, from the recipe and plan alone (no network, no weights)."""
    from enginesmith.builders.build.flags import parse_ranks
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    plan = make_plan(recipe, with_options=False)
    root = Path(out) / recipe.name
    m = recipe.model
    console.print(f"# {recipe.name}: fetch {m.source} @ {m.revision} (safetensors, config, tokenizer) -> {root / 'hf'}",
                  markup=False)
    if recipe.build.target == "trtllm-llmapi":
        console.print("# build.target trtllm-llmapi: the LLM API loads that Hugging Face checkpoint itself; "
                      "nothing is converted", markup=False)
        return
    if not plan.spec.convertible:
        console.print(f"# {plan.spec.architecture} can be planned but not converted yet", markup=False)
    selected = parse_ranks(ranks, plan.mapping.world_size)
    wanted = [r for r in plan.ranks if selected is None or r.rank in selected]
    console.print(f"# would write {root / 'checkpoint'}: config.json, tokenizer/, manifest.json and", markup=False)
    for r in wanted:
        console.print(f"#   rank{r.rank}.safetensors  {r.memory.weight_bytes / 2**30:,.2f} GiB  (node {r.node}, "
                      f"layers {r.layers[0]}-{r.layers[-1]})", markup=False)


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from enginesmith.builders.convert import ConvertError
    from enginesmith.builders.download import DownloadError
    from enginesmith.builders.mapping import MappingError
    from enginesmith.builders.model_spec import ModelSpecError

    from enginesmith.builders.build.flags import BuildFlagError

    errors: list[type[Exception]] = [ConvertError, DownloadError, MappingError, ModelSpecError, BuildFlagError]
    try:
        from enginesmith.builders.recipe import RecipeError

        errors.append(RecipeError)
    except ImportError:
        pass
    return tuple(errors)


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert(
        recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML.", exists=True, dir_okay=False)],
        out: Annotated[Path, typer.Option("--out", help="Working directory root.")] = Path("out"),
        workers: Annotated[int, typer.Option("--workers", min=0,
                                             help="Rank files written in parallel (0: min(4, CPUs)).")] = 0,
        allow_pickle: Annotated[bool, typer.Option("--allow-pickle",
                                                   help="Accept pickle *.bin weights (rewritten as safetensors).")]
        = False,
        ranks: Annotated[str | None, typer.Option(
            "--ranks", help="Rank files to write on this node, e.g. 2,3 or 4-7 (default: all).")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be fetched and written.")] = False,
    ) -> None:
        """Download the recipe's model and write `<out>/<name>/checkpoint/` (config.json, rank{N}.safetensors)."""
        start = time.perf_counter()
        try:
            if dry_run:
                return show_convert(recipe, out, ranks)
            result, ckpt = run_convert(recipe, out, workers or default_workers(), allow_pickle, ranks)
        except _bad_input_errors() as e:
            err_console.print(Text.assemble(("error:", "red"), " ", str(e)))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as e:
            from enginesmith.builders.cli.errors import fs_error

            err_console.print(Text.assemble(("error:", "red"), " ", fs_error(e, "--out", out)))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        key = result.manifest.key[:12]
        if result.up_to_date:
            console.print(f"checkpoint: up to date in {ckpt} (manifest key {key} unchanged); nothing written")
            return
        size = sum((ckpt / f).stat().st_size for f in result.written)
        reused = len(result.manifest.rank_files) - len(result.written)
        secs = time.perf_counter() - start
        console.print(f"wrote {len(result.written)} rank file(s), {size / 1e9:.3f} GB"
                      f"{f' ({reused} reused)' if reused else ''} in {secs:.1f} s -> {ckpt} (manifest key {key})")

    @app.command("tiny-model")
    def tiny_model(
        out_dir: Annotated[Path, typer.Argument(help="Folder to write the HF model into.")],
        arch: Annotated[str, typer.Option("--arch", help="llama | qwen2 | mixtral")] = "llama",
        seed: Annotated[int, typer.Option("--seed", help="Random seed of the weights.")] = 0,
    ) -> None:
        """Write a tiny random Hugging Face model + tokenizer (no network) for demos and tests."""
        from enginesmith.builders.tiny_model import ARCH_DEFAULTS, make_tiny_model

        if arch not in ARCH_DEFAULTS:
            err_console.print(Text.assemble(("error:", "red"), f" --arch {arch!r}: choose one of "
                                                              f"{', '.join(sorted(ARCH_DEFAULTS))}"))
            raise typer.Exit(EXIT_BAD_INPUT)
        try:
            path = make_tiny_model(out_dir, arch, seed=seed)
        except OSError as e:
            from enginesmith.builders.cli.errors import write_error

            err_console.print(Text.assemble(("error:", "red"), " ", write_error(e, "OUT_DIR", out_dir)))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        console.print(f"wrote tiny {arch} model (seed {seed}) to {path}")

