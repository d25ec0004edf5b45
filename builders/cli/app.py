"""The `enginesmith` console entry point: one typer app, one module per sub-command."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from enginesmith.builders.cli.help_format import PipelineGroup
from enginesmith.builders.cli.version import package_version

app = typer.Typer(
    name="enginesmith",
    cls=PipelineGroup,
    help="Plan, convert, build, serve and benchmark an LLM deployment from one YAML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"enginesmith {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version,
                                          is_eager=True)] = False,
) -> None:
    pass

# Each module defines `register(app)`; a sub-command exists only once its module is here.
COMMAND_MODULES: list[str] = [
    "enginesmith.builders.cli.commands_build",
    "enginesmith.builders.cli.commands_client",
    "enginesmith.builders.cli.commands_convert",
    "enginesmith.builders.cli.commands_demo",
    "enginesmith.builders.cli.commands_openai",
    "enginesmith.builders.cli.commands_plan",
    "enginesmith.builders.cli.commands_repo",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_all()


def main() -> None:
    app()

