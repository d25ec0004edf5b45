"""fetch_model: local folders, the offline Hub cache with a pinned commit, and the pickle policy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders.download import DownloadError, fetch_model, weight_kind
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
