"""A place the commands cannot write (/sys takes no new files or folders, not even from root) gives one error line
naming the path and the fix, with the command's exit code for user errors, and no traceback."""

from __future__ import annotations

import errno

from typer.testing import CliRunner

from enginesmith.builders.cli import app
from tests.support import REPO_ROOT, tiny_hf_model
from tests.test_convert_cli import write_recipe

runner = CliRunner()
UNWRITABLE = "/sys/enginesmith-out"
TINY = str(REPO_ROOT / "recipes" / "tiny-llama.yaml")


def error_line(result) -> str:
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_convert_to_an_unwritable_out(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_hf_model("llama"), parallel="{tp_size: 1}")
    r = runner.invoke(app, ["convert", str(recipe), "--out", UNWRITABLE])
    assert r.exit_code == 1
    assert error_line(r).startswith(f"error: --out {UNWRITABLE}: cannot write {UNWRITABLE} (Operation not permitted); "
                                    "choose a writable --out")


def test_plan_and_schema_to_an_unwritable_path():
    r = runner.invoke(app, ["plan", TINY, "--out", UNWRITABLE])
    assert r.exit_code == 2 and error_line(r).startswith(f"error: --out {UNWRITABLE}: cannot write {UNWRITABLE} (")
    r = runner.invoke(app, ["recipe", "schema", "--output", f"{UNWRITABLE}/schema.json"])
    assert r.exit_code == 2 and error_line(r).startswith(f"error: --output {UNWRITABLE}/schema.json: cannot write ")


def test_tiny_model_into_an_unwritable_folder():
    r = runner.invoke(app, ["tiny-model", f"{UNWRITABLE}/m"])
    assert r.exit_code == 1 and error_line(r).startswith(f"error: OUT_DIR {UNWRITABLE}/m: cannot write {UNWRITABLE}")


def converted(tmp_path):
    """The tiny-llama recipe converted under `tmp_path` (the --out of the build and repo commands)."""
    from enginesmith.builders.convert import convert_checkpoint
    from enginesmith.builders.model_spec import ModelSpec
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe

    recipe = load_recipe(TINY)
    hf = tiny_hf_model("llama")
    convert_checkpoint(hf, tmp_path / recipe.name / "checkpoint", make_plan(recipe).mapping,
                       ModelSpec.from_pretrained_dir(hf), "float32", "none", workers=1, progress=False)
    return tmp_path / recipe.name


def test_build_into_an_unwritable_engine_folder(tmp_path):
    root = converted(tmp_path)
    (root / "engine").symlink_to("/sys/kernel")  # a folder nobody may create files in
    r = runner.invoke(app, ["build", TINY, "--out", str(tmp_path)])
    assert r.exit_code == 1
    line = error_line(r)
    assert line.startswith(f"error: --out {tmp_path}: cannot write {root / 'engine'}/.engine_config.json.")
    assert "(Permission denied); choose a writable --out" in line


def test_repo_into_an_unwritable_folder(tmp_path, monkeypatch):
    root = converted(tmp_path)
    assert runner.invoke(app, ["build", TINY, "--out", str(tmp_path)]).exit_code == 0

    def refused(prefix, suffix, dir):  # root may write anywhere on this disk: the refusal is simulated here
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr("enginesmith.triton_repo.repository.tempfile.mkdtemp", refused)
    r = runner.invoke(app, ["repo", TINY, "--out", str(tmp_path)])
    assert r.exit_code == 1
    assert error_line(r) == (f"error: --out {tmp_path}: cannot write {root} (Permission denied); "
                             "choose a writable --out or fix that folder's permissions")
