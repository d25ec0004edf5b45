"""`enginesmith --version` and `--help`: the package version, sub-commands in pipeline order, on/off flags
without a type placeholder, the recipe argument named RECIPE."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError

import pytest
from typer.testing import CliRunner

from enginesmith.builders.cli import app, version
from enginesmith.builders.cli.help_format import PIPELINE_ORDER
from tests.support import REPO_ROOT

runner = CliRunner()
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
RECIPE_COMMANDS = ["plan", "convert", "build", "repo", "serve", "openai", "demo"]


def test_version_prints_the_installed_version_and_exits_0():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output == f"enginesmith {version.package_version()}\n"
    assert re.fullmatch(r"enginesmith \d+\.\d+\.\d+\S*\n", r.output)


def test_version_falls_back_to_pyproject_without_an_installed_distribution(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(version, "version", missing)
    want = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert version.package_version() == want


def test_pyproject_version_reads_the_project_table_only(tmp_path):
    p = tmp_path / "pyproject.toml"
    p.write_text('[tool.x]\nversion = "9.9"\n\n[project]\nname = "e"\nversion = "1.2.3"\n\n[tool.y]\nversion = "8"\n')
    assert version.pyproject_version(p) == "1.2.3"
    assert version.pyproject_version(tmp_path / "absent.toml") == "unknown"


def test_python_m_enginesmith_builders_cli_runs_the_same_app():
    r = subprocess.run([sys.executable, "-m", "enginesmith.builders.cli", "--version"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"enginesmith {version.package_version()}\n"


def test_help_lists_sub_commands_in_pipeline_order():
    r = runner.invoke(app, ["--help"], env=WIDE)
    assert r.exit_code == 0, r.output
    listed = re.findall(r"^│ ([a-z][a-z-]*) {2,}", r.output.split("Commands")[1], re.M)
    assert listed == list(PIPELINE_ORDER)


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["bench", "--help"], ["recipe", "schema", "--help"]])
def test_flags_have_no_type_placeholder_and_valued_options_keep_theirs(argv):
    r = runner.invoke(app, argv, env=WIDE)
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output
    assert re.search(r"--help\s+Show this message", r.output)
    if argv[0] == "serve":
        assert re.search(r"--public\s+Listen on every interface", r.output)
        assert re.search(r"--out\s+<path>", r.output)


@pytest.mark.parametrize("command", RECIPE_COMMANDS)
def test_the_recipe_argument_is_named_RECIPE(command):
    r = runner.invoke(app, [command, "--help"], env=WIDE)
    assert r.exit_code == 0, r.output
    assert re.search(r"Usage: .* \{?RECIPE\}?\s*$", r.output, re.M), r.output
    assert re.search(r"│ \*\s+RECIPE\s", r.output), r.output


def test_license_is_the_apache_2_text_pyproject_declares():
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject and 'license-files = ["LICENSE"]' in pyproject
