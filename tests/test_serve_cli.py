"""CLI behaviour around serving that needs no running server: untrusted text printed as it is."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from builders.cli import app

GLOO = "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:47495"


@pytest.mark.parametrize("module", ["builders.commands_repo", "builders.commands_client", "client.bench_cli"])
def test_errors_print_bracketed_text_as_it_is(module, capsys):
    """A gloo message's `[/...]` read as a rich closing tag raised MarkupError and hid the real error."""
    import importlib

    import typer

    mod = importlib.import_module(module)
    with pytest.raises(typer.Exit):
        if module == "builders.commands_repo":
            mod._fail(2, GLOO)
        elif module == "builders.commands_client":
            raise mod._fail(2, GLOO)
        else:
            raise mod._fail(GLOO)
    assert capsys.readouterr().err == f"error: {GLOO}\n"


def test_serve_reports_a_bracketed_path_as_it_is(tmp_path):
    recipe = tmp_path / "[/x]" / "r.yaml"
    r = CliRunner().invoke(app, ["serve", str(recipe)])
    assert r.exit_code == 1 and f"error: {recipe}: no such recipe file" in r.stderr
