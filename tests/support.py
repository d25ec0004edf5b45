"""Shared helpers for tests: tiny HF models built once per session, converted per mapping."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from enginesmith.builders.mapping import Mapping
from enginesmith.builders.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def tiny_hf_model(arch: str = "llama", seed: int = 0) -> Path:
    """A tiny random HF model folder, made once per test session."""
    d = Path(tempfile.mkdtemp(prefix=f"enginesmith-tiny-{arch}-"))
    return make_tiny_model(d, arch, seed=seed)


def convert_tiny(tmp_path: Path, arch: str, mapping: Mapping, dtype: str = "float32",
                 quantization: str = "none") -> Path:
    """Convert the session's tiny `arch` model for `mapping` into `tmp_path/ckpt`."""
    from enginesmith.builders.convert import convert_checkpoint
    from enginesmith.builders.model_spec import ModelSpec

    hf = tiny_hf_model(arch)
    out = tmp_path / "ckpt"
    convert_checkpoint(hf, out, mapping, ModelSpec.from_pretrained_dir(hf), dtype, quantization, workers=1)
    return out
