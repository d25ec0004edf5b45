"""fetch_model: local folders, the offline Hub cache with a pinned commit, and the pickle policy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from enginesmith.builders.download import DownloadError, fetch_model, weight_kind
from tests.support import tiny_hf_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama")


def test_local_folder_is_linked_with_a_content_revision(tmp_path, llama):
    src = tmp_path / "src"
    shutil.copytree(llama, src)
    res = fetch_model(str(src), dest=tmp_path / "work" / "hf")
    assert res.repo_id is None and res.revision.startswith("local:")
    assert (tmp_path / "work" / "hf").is_symlink() and res.path.resolve() == src.resolve()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(res.files)
    assert fetch_model(str(src), dest=tmp_path / "work" / "hf").revision == res.revision  # stable; relink works
    (src / "config.json").write_text((src / "config.json").read_text() + " ")
    assert fetch_model(str(src)).revision != res.revision


def fake_hub_cache(cache: Path, repo: str, files_from: Path) -> Path:
    """The on-disk layout huggingface_hub reads offline: refs/main -> commit, snapshots/<commit>/files."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        shutil.copy(f, snap / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def test_offline_uses_the_cache_and_pins_the_commit(tmp_path, llama, monkeypatch):
    snap = fake_hub_cache(tmp_path / "cache", "tiny-org/tiny-llama", llama)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = fetch_model("tiny-org/tiny-llama", "main", dest=tmp_path / "hf", cache_dir=tmp_path / "cache")
    assert res.revision == COMMIT and res.repo_id == "tiny-org/tiny-llama"
    assert (tmp_path / "hf").resolve() == snap.resolve()
    with pytest.raises(DownloadError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        fetch_model("tiny-org/other", "main", cache_dir=tmp_path / "cache")


def pickle_only(tmp_path: Path, llama: Path) -> Path:
    src = tmp_path / "pickled"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, src / name)
    torch.save(load_file(llama / "model.safetensors"), src / "pytorch_model.bin")
    return src


def test_pickle_weights_are_refused_unless_allowed(tmp_path, llama):
    src = pickle_only(tmp_path, llama)
    with pytest.raises(DownloadError, match="only pickle \\*.bin weights.*--allow-pickle"):
        fetch_model(str(src), dest=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    res = fetch_model(str(src), dest=tmp_path / "hf", allow_pickle=True)
    assert res.path == tmp_path / "hf" and not res.path.is_symlink()
    converted = load_file(res.path / "pytorch_model.safetensors")
    original = load_file(llama / "model.safetensors")
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)
    assert (res.path / "model.safetensors.index.json").is_file() and (res.path / "tokenizer.json").is_file()


def test_weight_kind_and_missing_weights(tmp_path):
    assert weight_kind(["model-00001-of-00002.safetensors", "pytorch_model.bin"]) == "safetensors"
    assert weight_kind(["pytorch_model.bin", "training_args.bin"]) == "pickle"
    assert weight_kind(["training_args.bin", "config.json"]) == "none"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DownloadError, match="has no \\*.safetensors"):
        fetch_model(str(tmp_path))
    with pytest.raises(DownloadError, match="is not a folder"):
        fetch_model(str(tmp_path / "config.json"))


# ---- model.source: local path or Hub id (the Hub's answers: tests/test_download_hub.py) ----------------------

def no_hub(monkeypatch, error: Exception | None = None) -> list:
    """Make any Hub call raise `error` (by default: fail the test); returns the calls it saw."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise error or AssertionError("the Hub must not be asked")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", refuse)
    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


@pytest.mark.parametrize("source,why", [
    ("out/tiny-llama-hf", "out/ is a folder here"),
    ("./tiny-llama-hf", "starts with '.'"),
    ("models/org/name", "at most one '/'"),
    ("my model", "not a valid Hugging Face repo id"),
])
def test_missing_local_path_names_the_folder_and_what_it_is_relative_to(tmp_path, monkeypatch, source, why):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    calls = no_hub(monkeypatch)
    with pytest.raises(DownloadError) as e:
        fetch_model(source, dest=tmp_path / "hf")
    msg = str(e.value)
    assert f"model.source={source!r}: no folder {tmp_path / source.removeprefix('./')} (" in msg
    assert why in msg and f"relative to the current directory {tmp_path}, not the recipe's folder" in msg
    assert "\n" not in msg and not calls and not (tmp_path / "hf").exists()
