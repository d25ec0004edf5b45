"""Run the build stage for a recipe's target inside its working directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enginesmith.builders.build.cache import BuildResult

TARGETS = ("trtllm-engine", "trtllm-llmapi", "reference")


@dataclass(frozen=True, slots=True)
class StageDirs:
    """`--out/<recipe.name>/` folders the build stage reads and writes (docs/ARCHITECTURE.md)."""

    root: Path
    hf: Path
    checkpoint: Path
    engine: Path

    @classmethod
    def of(cls, out: str | Path, name: str) -> StageDirs:
        root = Path(out) / name
        return cls(root, root / "hf", root / "checkpoint", root / "engine")


def run_build_stage(recipe, plan, out: str | Path, ranks=None, workers: int | None = None) -> BuildResult:
    """Build the recipe's `build.target`; a no-op when the cache key is unchanged."""
    dirs = StageDirs.of(out, recipe.name)
    target = recipe.build.target
    if target == "reference":
        from enginesmith.builders.build.reference import build_reference

        return build_reference(recipe, plan, dirs.checkpoint, dirs.engine)
    if target == "trtllm-llmapi":
        from enginesmith.builders.build.llmapi import build_llmapi

        return build_llmapi(recipe, plan, dirs.hf, dirs.engine)
    if target == "trtllm-engine":
        from enginesmith.builders.build.engine_target import build_trtllm_engine

        return build_trtllm_engine(recipe, plan, dirs.checkpoint, dirs.engine, ranks, workers)
    raise ValueError(f"build.target: {target!r} is not one of {', '.join(TARGETS)}")
