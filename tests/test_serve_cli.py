"""CLI behaviour around serving that needs no running server: untrusted text printed as it is, the
multi-node command with host placeholders, and clients that find no server exiting 2."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from enginesmith.builders.cli import app
from tests.support import REPO_ROOT

GLOO = "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:47495"


@pytest.mark.parametrize("module", ["enginesmith.builders.cli.commands_repo",
                                    "enginesmith.builders.cli.commands_openai",
                                    "enginesmith.builders.cli.commands_client",
                                    "enginesmith.client.bench_cli"])
def test_errors_print_bracketed_text_as_it_is(module, capsys):
    """A gloo message's `[/...]` read as a rich closing tag raised MarkupError and hid the real error."""
    import importlib

    import typer

    mod = importlib.import_module(module)
    with pytest.raises(typer.Exit):
        if module in ("enginesmith.builders.cli.commands_repo", "enginesmith.builders.cli.commands_openai"):
            mod._fail(2, GLOO)
        elif module == "enginesmith.builders.cli.commands_client":
            raise mod._fail(2, GLOO)
        else:
            raise mod._fail(GLOO)
    assert capsys.readouterr().err == f"error: {GLOO}\n"


def test_serve_reports_a_bracketed_path_as_it_is(tmp_path):
    recipe = tmp_path / "[/x]" / "r.yaml"
    r = CliRunner().invoke(app, ["serve", str(recipe)])
    assert r.exit_code == 1 and f"error: {recipe}: no such recipe file" in r.stderr


def test_openai_reports_an_unreachable_triton_with_a_bracketed_path_as_it_is(tmp_path, dead_port):
    """The message names the recipe's path; `[/x]` in it raised MarkupError with a traceback."""
    import yaml

    folder = tmp_path / "[/x]"
    (folder / "tok").mkdir(parents=True)
    recipe = folder / "r.yaml"
    data = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-llama.yaml").read_text())
    data["serve"]["grpc_port"] = dead_port
    recipe.write_text(yaml.safe_dump(data))
    r = CliRunner().invoke(app, ["openai", str(recipe), "--tokenizer", str(folder / "tok")])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"error: Triton at 127.0.0.1:{dead_port}: ") and r.stderr.count("\n") == 1
    assert r.stderr.endswith(f"is it running? (`enginesmith serve {recipe}`)\n")


def test_print_command_of_a_multi_node_layout_uses_host_placeholders():
    """It used to exit 1 demanding --hosts, though printing needs no hosts."""
    r = CliRunner().invoke(app, ["serve", str(REPO_ROOT / "recipes" / "llama3-70b-tp2-pp2.yaml"),
                                 "--print-command"])
    assert r.exit_code == 0, r.output
    assert "mpirun --allow-run-as-root -H '<host0>:2,<host1>:2' " in r.stdout
    assert r.stdout.count("tritonserver --model-repository=") == 4
    assert r.stderr == ("note: the layout spans 2 nodes; <host0>,<host1> stand for their hosts: give --hosts "
                        "node0,node1,... or --hostfile FILE to fill them in\n")
    given = CliRunner().invoke(app, ["serve", str(REPO_ROOT / "recipes" / "llama3-70b-tp2-pp2.yaml"),
                                     "--print-command", "--hosts", "a,b"])
    assert given.exit_code == 0 and "-H a:2,b:2 " in given.stdout and given.stderr == ""


@pytest.fixture
def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("protocol", ["stream", "grpc", "http"])
def test_clients_exit_2_when_the_server_is_unreachable(protocol, dead_port):
    """`client stream` and `client grpc` said 'is it loaded?' and exited 1, as if the model were missing."""
    r = CliRunner().invoke(app, ["client", protocol, "hi", "--url", f"127.0.0.1:{dead_port}"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: the server") and "is unreachable" in r.stderr
    assert "is it loaded" not in r.stderr and r.stderr.count("\n") == 1
