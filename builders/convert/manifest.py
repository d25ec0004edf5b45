"""`checkpoint/manifest.json`: what was converted, how, and the sha256 of every file written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field

from enginesmith.builders.convert.source import INDEX_NAME
from enginesmith.builders.manifest import StageManifest, sha256_json

FORMAT_VERSION = 1
"""Bump when the converter's output for the same inputs changes."""


class CheckpointManifest(StageManifest):
    """Manifest of a unified TensorRT-LLM checkpoint written by `convert_checkpoint`."""

    stage: str = "convert"
    source: dict[str, Any] = Field(default_factory=dict)
    """HF source: `path`, and `repo_id` / `revision` (pinned commit) when it came from the Hub."""
    mapping: dict[str, int] = Field(default_factory=dict)
    """TensorRT-LLM mapping (world_size, tp_size, pp_size, moe_tp_size, moe_ep_size, ...)."""
    dtype: str = ""
    quant_algo: str | None = None
    """W8A16 / W4A16 for weight-only checkpoints, else None."""
    prequantized: bool = False
    """True: rank files hold int8 weights + per_channel_scale; False with a quant_algo: float weights that
    trtllm-build quantizes."""
    plan: dict[str, Any] = Field(default_factory=dict)
    """The Plan the mapping came from (`Plan.to_dict()`), when convert ran from a recipe."""
    rank_files: list[str] = Field(default_factory=list)
    """`rank{N}.safetensors` written here, in rank order (a node of a multi-node layout: only its own)."""

    def rank_path(self, directory: str | Path, rank: int) -> Path:
        name = f"rank{rank}.safetensors"
        if name not in self.rank_files:
            raise KeyError(f"{name} is not in this checkpoint (it holds {', '.join(self.rank_files)})")
        return Path(directory) / name


def source_fingerprint(hf_dir: str | Path, files: list[Path]) -> str:
    """Hash of config.json, the index and every weight file's header, size and mtime (no data read)."""
    h = hashlib.sha256()
    root = Path(hf_dir)
    for extra in ("config.json", INDEX_NAME):
        if (root / extra).is_file():
            h.update((root / extra).read_bytes())
    for f in sorted(set(files)):
        st = f.stat()
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 100 << 20)))
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def convert_key(fingerprint: str, mapping: dict, dtype: str, quant_algo: str | None,
                revision: str | None) -> str:
    return sha256_json({"format": FORMAT_VERSION, "source": fingerprint, "revision": revision,
                        "mapping": mapping, "dtype": dtype, "quant_algo": quant_algo})


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
