"""Fetch a Hugging Face checkpoint: safetensors, config and tokenizer files only, revision pinned.

`fetch_model` accepts a Hub repo id or a local folder (builders.model_source decides which). Hub downloads
go through `snapshot_download` into the HF cache (its progress bars show), pinned to the commit the revision
resolves to, after checking that the files not cached yet fit the cache disk's free space; a gated
repository gets a message saying how to get access. With HF_HUB_OFFLINE=1 the cached snapshot is used.
`<dest>` (the recipe's `hf/` folder) becomes a link to the snapshot or local folder. Pickle `.bin` weights
are refused unless `allow_pickle`: then they are loaded with `torch.load(weights_only=True)` and rewritten
as safetensors next to the link, so the converter only ever reads safetensors.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from enginesmith.builders.convert.tokenizer import TOKENIZER_FILES
from enginesmith.builders.hub_errors import first_line, hub_error_message
from enginesmith.builders.model_source import SourceRef, classify_source

WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "pytorch_model.bin.index.json"]
META_PATTERNS = ["config.json", *TOKENIZER_FILES]


class DownloadError(ValueError):
    """The source cannot be fetched or holds no weights the converter may read."""


@dataclass(frozen=True)
class FetchResult:
    path: Path
    """Folder holding config.json, the safetensors weights and the tokenizer files."""
    repo_id: str | None
    """Hub repo id, or None for a local folder."""
    revision: str
    """Commit hash of the Hub snapshot, or `local:<hash of names, sizes, mtimes>` for a local folder."""
    files: list[str] = field(default_factory=list)


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def weight_kind(names: list[str]) -> str:
    """'safetensors', 'pickle' or 'none' for a list of file names."""
    if any(n.endswith(".safetensors") for n in names):
        return "safetensors"
    if any(n.endswith(".bin") and not n.startswith("training_args") for n in names):
        return "pickle"
    return "none"


def refuse_pickle(source: str, kind: str, allow_pickle: bool) -> None:
    if kind == "none":
        raise DownloadError(f"{source} has no *.safetensors (or *.bin) weights")
    if kind == "pickle" and not allow_pickle:
        raise DownloadError(f"{source} has only pickle *.bin weights; unpickling can run arbitrary code. "
                            "Pass --allow-pickle to accept them (loaded with torch.load(weights_only=True) "
                            "and rewritten as safetensors)")


def local_revision(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "local:" + h.hexdigest()[:16]


def _link(dest: Path | None, target: Path) -> Path:
    """Point `dest` at `target` (replacing an older link); returns the folder to read from."""
    if dest is None:
        return target
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        raise DownloadError(f"{dest} exists and is a real folder; remove it or choose another --out")
    tmp = dest.with_name(f".{dest.name}.link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve(), target_is_directory=True)
    os.replace(tmp, dest)
    return dest


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hub snapshot, as the repo's file metadata gives it."""

    name: str
    size: int
    blob: str | None
    """Name of its blob in the HF cache (the LFS sha256, or the git blob id), if the Hub gave one."""


def _repo_listing(ref: SourceRef, revision: str) -> tuple[str, list[RemoteFile]]:
    """The commit `revision` resolves to and the snapshot's files with their sizes: one metadata call, which
    every supported huggingface_hub makes alike and which raises the Hub's own errors (gated, not found)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(ref.text, revision=revision, files_metadata=True)
    except Exception as e:  # the Hub's errors, or its HTTP library's when the network fails
        raise DownloadError(hub_error_message(ref, revision, e, "list")) from None
    siblings = info.siblings or []
    return info.sha, [RemoteFile(s.rfilename, s.size or 0, (s.lfs or {}).get("sha256") or s.blob_id) for s in siblings]


def _cached(f: RemoteFile, repo_id: str, commit: str, cache: Path) -> bool:
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    return (folder / "snapshots" / commit / f.name).is_file() or (f.blob is not None and
                                                                    (folder / "blobs" / f.blob).is_file())


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(files: list[RemoteFile], repo_id: str, commit: str, cache: Path) -> None:
    """Refuse a download whose files (those not in `cache` yet) need more bytes than its disk has free."""
    todo = [f for f in files if not _cached(f, repo_id, commit, cache)]
    need = sum(f.size for f in todo)
    disk = _existing_parent(cache)
    free = shutil.disk_usage(disk).free
    if need > free:
        raise DownloadError(f"{repo_id}@{commit[:12]} needs {_gb(need)} for {len(todo)} file(s) not in the cache "
                            f"yet, and {disk} has {_gb(free)} free; free {_gb(need - free)} or more there, or point "
                            "HF_HUB_CACHE (or HF_HOME) at a disk with room")


def _hub_snapshot(ref: SourceRef, revision: str, allow_pickle: bool, cache_dir) -> tuple[Path, str]:
    """Download (or, offline, locate) the snapshot; returns (folder, commit hash)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id = ref.text
    kw = dict(repo_id=repo_id, cache_dir=cache_dir)
    if is_offline():
        everything = WEIGHT_PATTERNS + PICKLE_PATTERNS + META_PATTERNS
        try:
            path = Path(snapshot_download(revision=revision, local_files_only=True, allow_patterns=everything, **kw))
        except LocalEntryNotFoundError:
            raise DownloadError(f"{repo_id}@{revision} is not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                                f"({ref.not_local_either()}); download it once online or set model.source to a "
                                "local folder") from None
        return path, path.name
    commit, files = _repo_listing(ref, revision)
    kind = weight_kind([f.name for f in files])
    refuse_pickle(f"{repo_id}@{revision}", kind, allow_pickle)
    patterns = META_PATTERNS + (WEIGHT_PATTERNS if kind == "safetensors" else PICKLE_PATTERNS)
    wanted = [f for f in files if any(fnmatch.fnmatch(f.name, p) for p in patterns)]
    check_free_space(wanted, repo_id, commit, Path(cache_dir or constants.HF_HUB_CACHE))
    try:
        return Path(snapshot_download(revision=commit, allow_patterns=patterns, **kw)), commit
    except (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError) as e:
        raise DownloadError(hub_error_message(ref, revision, e, "download")) from None
    except OSError as e:
        raise DownloadError(f"downloading {repo_id}@{commit[:12]} failed: {e.strerror or first_line(e)}"
                            f"{f' ({e.filename})' if e.filename else ''}; fix that and run again (finished files "
                            "stay in the cache)") from None
    except Exception as e:  # the HTTP library's own (httpx), e.g. a connection dropped mid-file
        raise DownloadError(f"downloading {repo_id}@{commit[:12]} failed: {type(e).__name__}: {first_line(e)}; "
                            "run again (finished files stay in the cache)") from None


def fetch_model(source: str, revision: str = "main", dest: str | Path | None = None, allow_pickle: bool = False,
                cache_dir: str | Path | None = None) -> FetchResult:
    """Make `source` (Hub id or local folder) available as safetensors under `dest` (a link) or in place."""
    dest = Path(dest) if dest is not None else None
    ref = classify_source(source)
    if ref.local:
        if not ref.path.exists():
            raise DownloadError(ref.missing())
        if not ref.path.is_dir():
            raise DownloadError(f"model.source={source!r}: {ref.path} is not a folder; point it at the folder "
                                "holding config.json")
        folder, repo_id, rev = ref.path.resolve(), None, local_revision(ref.path)
    else:
        folder, rev = _hub_snapshot(ref, revision, allow_pickle, cache_dir)
        repo_id = source
    names = sorted(p.name for p in folder.iterdir())
    if not (folder / "config.json").is_file():
        raise DownloadError(f"{source} has no config.json")
    kind = weight_kind(names)
    refuse_pickle(source, kind, allow_pickle)
    if kind == "pickle":
        if dest is None:
            raise DownloadError(f"{source}: rewriting pickle weights as safetensors needs a destination folder")
        path = pickle_to_safetensors(folder, dest)
    else:
        path = _link(dest, folder)
    return FetchResult(path=path, repo_id=repo_id, revision=rev, files=sorted(p.name for p in path.iterdir()))


def pickle_to_safetensors(src: Path, dest: Path) -> Path:
    """Rewrite every `*.bin` of `src` as `dest/<name>.safetensors` (+ index); link config and tokenizer files."""
    import json

    import torch
    from safetensors.torch import save_file

    from enginesmith.builders.manifest import atomic_write_text

    if dest.is_symlink():
        dest.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for b in sorted(src.glob("*.bin")):
        if b.name.startswith("training_args"):
            continue
        out = dest / (b.stem + ".safetensors")
        state = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
        if not out.is_file():
            tmp = dest / f".{out.name}.tmp"
            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
            os.replace(tmp, out)
        weight_map |= {k: out.name for k in state}
    atomic_write_text(dest / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in META_PATTERNS:
        if (src / name).is_file() and not (dest / name).exists():
            (dest / name).symlink_to((src / name).resolve())
    return dest
