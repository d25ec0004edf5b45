"""Tokenizer files travel with the checkpoint (`<checkpoint>/tokenizer/`) for the Triton pre/post-processing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from enginesmith.builders.manifest import sha256_file

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
)
"""Files copied when present (HF fast and slow tokenizers, chat templates, generation defaults)."""


def copy_tokenizer(hf_dir: str | Path, out_dir: str | Path, sub: str = "tokenizer") -> dict[str, str]:
    """Copy the tokenizer files (temp name + rename each); returns {relative path: sha256}."""
    src, dst = Path(hf_dir), Path(out_dir) / sub
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=dst)
        os.fchmod(fd, 0o644)
        try:
            with open(fd, "wb") as f, open(src / name, "rb") as g:
                shutil.copyfileobj(g, f)
            Path(tmp).replace(dst / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        out[f"{sub}/{name}"] = sha256_file(dst / name)
    return out


def tokenizer_digests(hf_dir: str | Path, sub: str = "tokenizer") -> dict[str, str]:
    """{relative path: sha256} that `copy_tokenizer` would record, without copying."""
    src = Path(hf_dir)
    return {f"{sub}/{name}": sha256_file(src / name) for name in TOKENIZER_FILES if (src / name).is_file()}
