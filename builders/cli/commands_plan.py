"""CLI: `enginesmith plan RECIPE [--json] [--out DIR]` and `enginesmith recipe schema [--output FILE]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from enginesmith.builders.cli.errors import write_error
from enginesmith.builders.manifest import atomic_write_text
from enginesmith.builders.model_spec import ModelSpecError
from enginesmith.builders.recipe import Recipe, RecipeError, load_recipe


def plan_command(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of tables.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write <OUT>/<recipe name>/plan.json.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 when the plan misses its SLA.")] = False,
) -> None:
    """Resolve a recipe into a layout with memory, roofline, communication and an SLA verdict."""
    from enginesmith.builders.planner.plan import make_plan

    try:
        plan = make_plan(load_recipe(recipe))
    except (RecipeError, ModelSpecError) as e:
        typer.echo(f"error: {recipe}:\n{e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        from enginesmith.builders.planner.plan_render import render

        render(plan)
    if out is not None:
        path = out / plan.recipe.name / "plan.json"
        try:
            atomic_write_text(path, json.dumps(plan.to_dict(), indent=2) + "\n")
        except OSError as e:
            typer.echo(f"error: {write_error(e, '--out', out)}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {path}", err=True)
    if check and not plan.sla.meets:
        raise typer.Exit(1)


def schema_command(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the schema here, not stdout.")] = None,
) -> None:
    """Print (or write) the recipe's JSON Schema, for editor completion of recipes/*.yaml."""
    text = json.dumps(Recipe.model_json_schema(), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        try:
            atomic_write_text(output, text)
        except OSError as e:
            typer.echo(f"error: {write_error(e, '--output', output)}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {output}", err=True)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
    recipe_app = typer.Typer(help="Recipe tools.", no_args_is_help=True)
    recipe_app.command("schema")(schema_command)
    app.add_typer(recipe_app, name="recipe")
