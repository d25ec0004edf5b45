"""Check a converted checkpoint against its manifest and the plan before anything is built from it."""

from __future__ import annotations

import json
from pathlib import Path

from enginesmith.builders.manifest import MANIFEST_NAME, StageManifest, sha256_file

MAPPING_KEYS = ("world_size", "tp_size", "pp_size", "moe_tp_size", "moe_ep_size")


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unfinished, altered, or made for another layout."""


def read_checkpoint_manifest(ckpt_dir: str | Path) -> StageManifest:
    ckpt_dir = Path(ckpt_dir)
    manifest = StageManifest.read(ckpt_dir)
    if manifest is None:
        raise CheckpointError(f"no {MANIFEST_NAME} in {ckpt_dir}: the checkpoint is missing or unfinished; "
                              "run `enginesmith convert RECIPE` first")
    return manifest


def validate_checkpoint(ckpt_dir: str | Path, mapping, ranks=None, check_hash: bool = True) -> StageManifest:
    """The checkpoint's manifest, after checking config.json's mapping and the rank files.

    `ranks` limits the rank files checked (a node of a multi-node layout holds only its own);
    `check_hash` re-hashes every file against the manifest's sha256 (off: presence only).
    """
    ckpt_dir = Path(ckpt_dir)
    manifest = read_checkpoint_manifest(ckpt_dir)
    config_path = ckpt_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing; re-run `enginesmith convert RECIPE`")
    got = json.loads(config_path.read_text()).get("mapping", {})
    want = {k: getattr(mapping, k) for k in MAPPING_KEYS}
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}={g} (plan: {w})" for k, (g, w) in diff.items())
        raise CheckpointError(f"{config_path} was converted for another layout: {detail}; "
                              "re-run `enginesmith convert RECIPE` for the current plan")
    ranks = range(mapping.world_size) if ranks is None else ranks
    names = ["config.json"] + [f"rank{r}.safetensors" for r in ranks]
    unlisted = [n for n in names if n not in manifest.outputs]
    if unlisted:
        raise CheckpointError(f"{ckpt_dir}/{MANIFEST_NAME} does not list {', '.join(unlisted)}; "
                              "re-run `enginesmith convert RECIPE`")
    bad = [n for n in names
           if not (ckpt_dir / n).is_file() or (check_hash and sha256_file(ckpt_dir / n) != manifest.outputs[n])]
    if bad:
        raise CheckpointError(f"{ckpt_dir}: {', '.join(bad)} missing or changed since conversion "
                              "(sha256 differs from manifest.json); re-run `enginesmith convert RECIPE`")
    return manifest
