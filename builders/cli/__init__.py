"""The `enginesmith` CLI: one typer app (`app.py`), one module per sub-command."""

from enginesmith.builders.cli.app import app, main

__all__ = ["app", "main"]
