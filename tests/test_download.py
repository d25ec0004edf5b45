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


# ---- model.source: local path or Hub id; the Hub mocked (no network) -------------------------------------------

def hub_error(cls, message: str):
    from types import SimpleNamespace

    return cls(message, response=SimpleNamespace(headers={}, request=None))


def fake_hub(monkeypatch, listing=None, error=None, snapshot: Path | None = None) -> list[dict]:
    """Replace huggingface_hub.snapshot_download: the dry run returns `listing` (or raises `error`), the
    download returns `snapshot`; returns the calls it saw."""
    calls: list[dict] = []

    def snapshot_download(**kw):
        calls.append(kw)
        if error is not None:
            raise error
        return listing if kw.get("dry_run") else str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def listing_of(folder: Path, sizes: dict[str, int] | None = None, cached: tuple[str, ...] = ()):
    from huggingface_hub import DryRunFileInfo

    sizes = sizes or {}
    return [DryRunFileInfo(commit_hash=COMMIT, file_size=sizes.get(p.name, p.stat().st_size), filename=p.name,
                           local_path=str(p), is_cached=p.name in cached, will_download=p.name not in cached)
            for p in sorted(folder.iterdir())]


@pytest.mark.parametrize("source,why", [
    ("out/tiny-llama-hf", "out/ is a folder here"),
    ("./tiny-llama-hf", "starts with '.'"),
    ("models/org/name", "at most one '/'"),
    ("my model", "not a valid Hugging Face repo id"),
])
def test_missing_local_path_names_the_folder_and_what_it_is_relative_to(tmp_path, monkeypatch, source, why):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    calls = fake_hub(monkeypatch, error=AssertionError("the Hub must not be asked"))
    with pytest.raises(DownloadError) as e:
        fetch_model(source, dest=tmp_path / "hf")
    msg = str(e.value)
    assert f"model.source={source!r}: no folder {tmp_path / source.removeprefix('./')} (" in msg
    assert why in msg and f"relative to the current directory {tmp_path}, not the recipe's folder" in msg
    assert "\n" not in msg and not calls and not (tmp_path / "hf").exists()


def test_org_name_shape_that_is_neither_folder_nor_repo(tmp_path, monkeypatch):
    """A fresh clone has no out/ yet: `out/tiny-llama-hf` looks like org/name, so the Hub is asked; its answer
    comes with the local folder that was not there."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    monkeypatch.chdir(tmp_path)
    fake_hub(monkeypatch, error=hub_error(RepositoryNotFoundError, "404 Client Error.\n\nRepository Not Found"))
    with pytest.raises(DownloadError) as e:
        fetch_model("out/tiny-llama-hf")
    assert str(e.value) == (f"model.source='out/tiny-llama-hf': no Hub repo out/tiny-llama-hf (a private one needs "
                            f"HF_TOKEN), and no local folder {tmp_path / 'out' / 'tiny-llama-hf'} either (resolved "
                            f"relative to the current directory {tmp_path}, not the recipe's folder); fix the repo id "
                            "or the path")
    fake_hub(monkeypatch, error=LocalEntryNotFoundError("cannot reach huggingface.co\nmore"))
    with pytest.raises(DownloadError, match=r"cannot list out/tiny-llama-hf@main on the Hub \(LocalEntryNotFoundError: "
                                            r"cannot reach huggingface.co\), and no local folder .*out/tiny-llama-hf "
                                            r"either") as e:
        fetch_model("out/tiny-llama-hf")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("token", [None, "hf_test"])
def test_gated_repository_says_how_to_get_access(tmp_path, monkeypatch, token):
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    fake_hub(monkeypatch, error=hub_error(GatedRepoError, "403 Client Error.\n\nCannot access gated repo"))
    with pytest.raises(DownloadError) as e:
        fetch_model("meta-llama/Llama-3.1-8B", dest=tmp_path / "hf")
    msg = str(e.value)
    assert msg.startswith("meta-llama/Llama-3.1-8B is a gated repository (")
    assert "request access on https://huggingface.co/meta-llama/Llama-3.1-8B" in msg and "set HF_TOKEN" in msg
    assert ("HF_TOKEN is not set" in msg) == (token is None) and ("no access to it yet" in msg) == bool(token)


def test_download_checks_free_disk_space_first(tmp_path, monkeypatch, llama):
    import shutil as sh

    free = sh.disk_usage(tmp_path).free
    calls = fake_hub(monkeypatch, listing=listing_of(llama, {"model.safetensors": 2 * free + 10**9}))
    with pytest.raises(DownloadError) as e:
        fetch_model("tiny-org/tiny-llama", dest=tmp_path / "hf", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert msg.startswith(f"tiny-org/tiny-llama@{COMMIT[:12]} needs ") and f"and {tmp_path} has " in msg
    assert "file(s) not in the cache yet" in msg and "HF_HUB_CACHE" in msg
    assert [c.get("dry_run") for c in calls] == [True]  # nothing was downloaded
    # the same listing with the big file already cached fits: the download runs, pinned to the listed commit
    cached = listing_of(llama, {"model.safetensors": 2 * free}, cached=("model.safetensors",))
    calls = fake_hub(monkeypatch, listing=cached, snapshot=llama)
    res = fetch_model("tiny-org/tiny-llama", dest=tmp_path / "hf", cache_dir=tmp_path / "cache")
    assert res.revision == COMMIT and res.repo_id == "tiny-org/tiny-llama" and res.path.resolve() == llama.resolve()
    assert calls[1]["revision"] == COMMIT and "*.safetensors" in calls[1]["allow_patterns"]
