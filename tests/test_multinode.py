"""Two nodes without a shared filesystem: each node converts, builds and writes only its own ranks (`--ranks`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from enginesmith.builders.build.checkpoint import CheckpointError, validate_checkpoint
from enginesmith.builders.cli import app
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.tiny_model import make_tokenizer
from tests.support import tiny_hf_model
from tests.test_repository import engine_recipe, recipe, reference_engine, trtllm_engine, write
from enginesmith.triton_repo.repository import RepoError

REPO = Path(__file__).resolve().parents[1]
RECIPE_70B = REPO / "recipes" / "llama3-70b-tp2-pp2.yaml"
runner = CliRunner()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


def test_convert_writes_only_the_nodes_ranks(tmp_path):
    from enginesmith.builders.convert import convert_checkpoint
    from enginesmith.builders.model_spec import ModelSpec

    hf, mapping = tiny_hf_model("llama"), Mapping.create(2, 2)
    node1 = convert_checkpoint(hf, tmp_path / "ckpt", mapping, ModelSpec.from_pretrained_dir(hf), "float32",
                               "none", workers=1, progress=False, ranks=(2, 3))
    assert node1.rank_files == ["rank2.safetensors", "rank3.safetensors"]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("rank*")) == node1.rank_files
    assert "rank0.safetensors" not in node1.outputs and (tmp_path / "ckpt" / "tokenizer").is_dir()
    validate_checkpoint(tmp_path / "ckpt", mapping, ranks=(2, 3))
    with pytest.raises(CheckpointError, match="does not list rank0.safetensors, rank1.safetensors"):
        validate_checkpoint(tmp_path / "ckpt", mapping)
    with pytest.raises(KeyError, match="rank0.safetensors is not in this checkpoint"):
        node1.rank_path(tmp_path / "ckpt", 0)
    # The same conversion of all ranks reuses the two already written (same key) and writes the others.
    full = convert_checkpoint(hf, tmp_path / "ckpt", mapping, ModelSpec.from_pretrained_dir(hf), "float32", "none",
                              workers=1, progress=False)
    assert full.outputs["rank2.safetensors"] == node1.outputs["rank2.safetensors"] and len(full.rank_files) == 4


def test_convert_of_a_nodes_ranks_says_what_it_wrote(tmp_path):
    from enginesmith.builders.convert import convert
    from enginesmith.builders.model_spec import ModelSpec

    hf, mapping = tiny_hf_model("llama"), Mapping.create(2, 2)
    spec = ModelSpec.from_pretrained_dir(hf)

    def run(ranks):
        return convert(hf, tmp_path / "ckpt", mapping, spec, "float32", "none", workers=1, progress=False,
                       ranks=ranks)

    first = run((3, 2))
    assert first.written == ["rank2.safetensors", "rank3.safetensors"] and not first.up_to_date
    again = run((2, 3))
    assert again.written == [] and again.up_to_date and again.manifest.rank_files == first.manifest.rank_files
    rest = run(None)  # the whole layout: only the two missing rank files are written
    assert rest.written == ["rank0.safetensors", "rank1.safetensors"] and not rest.up_to_date
    assert rest.manifest.rank_files == [f"rank{r}.safetensors" for r in range(4)]


def test_convert_cli_refuses_ranks_outside_the_layout(tmp_path):
    r = runner.invoke(app, ["convert", str(RECIPE_70B), "--out", str(tmp_path), "--ranks", "4"])
    assert r.exit_code == 1
    assert "--ranks '4': ranks must lie in 0..3 (world_size=4)" in r.output.replace("\n", "")


def node_engine(d: Path, ranks: tuple[int, ...], tp: int = 2, pp: int = 2, max_batch_size: int = 16) -> Path:
    trtllm_engine(d, tp=tp, pp=pp, max_batch_size=max_batch_size)
    for r in set(range(tp * pp)) - set(ranks):
        (d / f"rank{r}.engine").unlink()
    return d


def test_repo_checks_only_the_nodes_engines(tmp_path, tokenizer_dir):
    r = engine_recipe(parallel={"tp_size": 2, "pp_size": 2})
    engine = node_engine(tmp_path / "engine", (2, 3))
    m = write(r, engine, tokenizer_dir, tmp_path / "repo", ranks=(2, 3))
    assert m.ranks == [2, 3] and m.launch_ranks == 4 and "tensorrt_llm" in m.models
    with pytest.raises(RepoError, match=r"lacks rank0.engine, rank1.engine of --ranks 0,1; run `enginesmith build "
                                        r"RECIPE --ranks 0,1` on this node first"):
        write(r, engine, tokenizer_dir, tmp_path / "repo0", ranks=(0, 1))
    with pytest.raises(RepoError, match="holds 2 rank.*give --ranks with this node's ranks"):
        write(r, engine, tokenizer_dir, tmp_path / "repo-all")
    with pytest.raises(RepoError, match="--ranks applies to build.target trtllm-engine only"):
        write(recipe(), reference_engine(tmp_path / "ref"), tokenizer_dir, tmp_path / "ref-repo", ranks=(0,))


def _node_dir(out: Path, tokenizer_dir: Path, ranks: tuple[int, ...]) -> None:
    root = out / "llama3-70b-tp2-pp2"
    node_engine(root / "engine", ranks, max_batch_size=64)
    shutil.copytree(tokenizer_dir, root / "checkpoint" / "tokenizer")


def test_repo_cli_on_each_node_and_what_it_says(tmp_path, tokenizer_dir):
    for node, ranks in ((0, (0, 1)), (1, (2, 3))):
        out = tmp_path / f"node{node}"
        _node_dir(out, tokenizer_dir, ranks)
        rs = ",".join(map(str, ranks))
        r = runner.invoke(app, ["repo", str(RECIPE_70B), "--out", str(out), "--ranks", rs], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        text = " ".join(r.stdout.split())
        assert f"2 nodes, per-node directories: this node holds ranks {rs}" in text
        assert "in a directory at that same path" in text
    shared = tmp_path / "shared"
    _node_dir(shared, tokenizer_dir, (0, 1, 2, 3))
    r = runner.invoke(app, ["repo", str(RECIPE_70B), "--out", str(shared)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "2 nodes, shared filesystem: all 4 engine ranks are here" in " ".join(r.stdout.split())
    r = runner.invoke(app, ["repo", str(RECIPE_70B), "--out", str(tmp_path / "node1")])
    assert r.exit_code == 1 and "give --ranks" in " ".join(r.output.split())


def test_serve_on_node0_takes_its_ranks_and_starts_every_rank_on_the_same_paths(tmp_path, tokenizer_dir,
                                                                               monkeypatch):
    """Per-node directories: node 0 serves with its own --ranks; mpirun then opens these paths on every node."""
    from enginesmith.triton_repo.server import ServerError, TritonServer

    launched = []

    def start(self):  # the launch itself needs mpirun and the tensorrtllm backend: record it and stop there
        launched.append(self.argv(dry=True))
        raise ServerError("stopped before launch by the test")

    monkeypatch.setattr(TritonServer, "start", start)
    out = tmp_path / "node0"
    _node_dir(out, tokenizer_dir, (0, 1))
    r = runner.invoke(app, ["serve", str(RECIPE_70B), "--out", str(out), "--ranks", "0,1", "--hosts", "a,b"])
    assert r.exit_code == 2 and "stopped before launch by the test" in r.stderr, r.output
    assert "2 nodes, per-node directories: this node holds ranks 0,1" in " ".join(r.stdout.split())
    argv, repo = launched[0], (out / "llama3-70b-tp2-pp2" / "repo").resolve()
    assert argv[argv.index("-H") + 1] == "a:2,b:2" and argv.count("-n") == 4
    assert argv.count(f"--model-repository={repo}") == 4
    r = runner.invoke(app, ["serve", str(RECIPE_70B), "--out", str(out), "--hosts", "a,b"])
    assert r.exit_code == 1 and "give --ranks with this node's ranks" in " ".join(r.stderr.split())
    assert len(launched) == 1


def test_serve_print_command_says_the_paths_must_match_on_every_node(tmp_path):
    r = runner.invoke(app, ["serve", str(RECIPE_70B), "--out", str(tmp_path), "--print-command", "--hosts", "a,b"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"# 2 nodes: every rank opens {(tmp_path / 'llama3-70b-tp2-pp2' / 'repo').resolve()}")
    assert "-H a:2,b:2" in lines[-1] and lines[-1].count("-n 1") == 4


def test_convert_dry_run_lists_the_nodes_rank_files(tmp_path):
    r = runner.invoke(app, ["convert", str(RECIPE_70B), "--out", str(tmp_path), "--dry-run", "--ranks", "2,3"])
    assert r.exit_code == 0, r.output
    files = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("#   rank")]
    assert files == ["rank2.safetensors", "rank3.safetensors"]
    assert "(node 1, layers 40-79)" in r.stdout and not (tmp_path / "llama3-70b-tp2-pp2").exists()
