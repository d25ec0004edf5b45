"""Stage manifests: what went in (hashes), which tools, what came out (sha256 per file).

Every stage directory ends with a `manifest.json`. It is written last, atomically, so a
directory without one (or whose files no longer match it) is an unfinished or torn run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def tool_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in ("enginesmith", *names):
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


class StageManifest(BaseModel):
    """Common part of every stage's manifest.json."""

    model_config = ConfigDict(extra="allow")

    stage: str
    key: str = ""
    """Cache key: hash of everything that determines the outputs (inputs, options, tool versions)."""
    inputs: dict[str, str] = Field(default_factory=dict)
    """Name -> hash of each input (upstream manifest hashes, recipe sections, source revision)."""
    versions: dict[str, str] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    """Relative path -> sha256 of every file the stage wrote."""
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> StageManifest | None:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            return None
        return cls.model_validate_json(path.read_text())

    def digest(self) -> str:
        """Hash identifying this stage's result, used as an input hash by the next stage."""
        return sha256_json({"stage": self.stage, "key": self.key, "outputs": self.outputs})

    def mismatched_outputs(self, directory: str | Path, check_hash: bool = True) -> list[str]:
        """Outputs that are missing or whose content differs from the recorded sha256."""
        bad = []
        for rel, digest in self.outputs.items():
            p = Path(directory) / rel
            if not p.is_file() or (check_hash and sha256_file(p) != digest):
                bad.append(rel)
        return bad

    def is_complete(self, directory: str | Path, key: str, check_hash: bool = True) -> bool:
        """True when this manifest was made with `key` and every output is intact."""
        return self.key == key and not self.mismatched_outputs(directory, check_hash)
