"""How `--help` lists things: sub-commands in pipeline order, on/off flags without a `<bool>` type."""

from __future__ import annotations

import click
from typer.core import TyperGroup

PIPELINE_ORDER = ("plan", "convert", "build", "repo", "serve", "openai", "client", "bench", "analyze", "demo",
                  "tiny-model", "recipe")


class PipelineGroup(TyperGroup):
    """The root command group: lists sub-commands in PIPELINE_ORDER (others after them, as registered)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        hide_flag_types(self)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)  # typer adds the completion flags after __init__
        _hide_types(params)
        return params

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {n: i for i, n in enumerate(PIPELINE_ORDER)}
        return sorted(names, key=lambda n: rank.get(n, len(rank)))


def hide_flag_types(command: click.Command) -> None:
    """An empty metavar on every on/off flag of `command` and its sub-commands, `--help` included: the help
    shows no type for them."""
    _hide_types([*command.params, command.get_help_option(click.Context(command))])
    for sub in getattr(command, "commands", {}).values():
        hide_flag_types(sub)


def _hide_types(params: list) -> None:
    for param in params:
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            param.metavar = ""
