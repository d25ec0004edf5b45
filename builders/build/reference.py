"""Build target `reference`: no compile step, just a checked engine_config.json for the PyTorch runtime.

Layout per docs/ARCHITECTURE.md "Reference engine directory": `engine/engine_config.json` +
`engine/manifest.json` (EngineManifest).
"""

from __future__ import annotations

import json
from pathlib import Path

from enginesmith.builders.build.cache import (
    IGNORED_FACTORS,
    BuildResult,
    EngineManifest,
    cache_key,
    changed_factors,
    is_fresh,
    remove_stale_outputs,
)
from enginesmith.builders.build.checkpoint import validate_checkpoint
from enginesmith.builders.manifest import atomic_write_text, sha256_file, tool_versions

TARGET = "reference"
ENGINE_CONFIG = "engine_config.json"


def reference_engine_config(recipe, ckpt_dir: str | Path, pp_micro_batches: int = 1) -> dict:
    """The engine_config.json the reference runtime loads."""
    b = recipe.build
    return {
        "target": TARGET,
        "checkpoint_dir": str(Path(ckpt_dir).resolve()),
        "max_batch_size": b.max_batch_size,
        "max_input_len": b.max_input_len,
        "max_seq_len": b.max_seq_len,
        "max_num_tokens": b.max_num_tokens,
        "max_beam_width": b.max_beam_width,
        "tokens_per_block": b.tokens_per_block,
        "dtype": recipe.model.dtype,
        "pp_micro_batches": pp_micro_batches,
    }


def reference_factors(recipe, ckpt_manifest, ckpt_dir: str | Path, pp_micro_batches: int = 1) -> dict:
    return {
        "target": TARGET,
        "checkpoint": ckpt_manifest.digest(),
        "engine_config": reference_engine_config(recipe, ckpt_dir, pp_micro_batches),
        "enginesmith": tool_versions().get("enginesmith", "unknown"),
    }


def build_reference(recipe, plan, ckpt_dir: str | Path, engine_dir: str | Path) -> BuildResult:
    """Validate the checkpoint (every file re-hashed) and write engine_config.json, unless up to date."""
    ckpt_dir, engine_dir = Path(ckpt_dir), Path(engine_dir)
    ckpt_manifest = validate_checkpoint(ckpt_dir, plan.mapping, check_hash=True)
    factors = reference_factors(recipe, ckpt_manifest, ckpt_dir, plan.pipeline.micro_batches)
    key = cache_key(factors)
    old = EngineManifest.read(engine_dir)
    if is_fresh(old, key, engine_dir):
        return BuildResult(TARGET, engine_dir, skipped=True)
    changed = changed_factors(old, factors)
    config = factors["engine_config"]
    atomic_write_text(engine_dir / ENGINE_CONFIG, json.dumps(config, indent=2) + "\n")
    remove_stale_outputs(old, {ENGINE_CONFIG}, engine_dir)
    EngineManifest(
        target=TARGET, key=key, factors=factors, ignored_factors=IGNORED_FACTORS[TARGET],
        inputs={"checkpoint": ckpt_manifest.digest()}, versions=tool_versions(),
        outputs={ENGINE_CONFIG: sha256_file(engine_dir / ENGINE_CONFIG)},
        build_config={k: v for k, v in config.items() if k not in ("target", "checkpoint_dir")},
        checkpoint_dir=config["checkpoint_dir"],
    ).write(engine_dir)
    return BuildResult(TARGET, engine_dir, skipped=False, changed=changed, built=[ENGINE_CONFIG])
