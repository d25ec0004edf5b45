"""Build cache: the EngineManifest and its keys.

Like vLLM's `compute_hash`, a key hashes exactly the factors that change the outputs, and each
target names the factors it ignores on purpose. Same key -> the build is skipped; a changed key
rebuilds only what changed: for `trtllm-engine` each rank engine has its own key (common factors +
that rank's checkpoint file hash), so re-converting one rank rebuilds one engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from enginesmith.builders.manifest import StageManifest, sha256_file, sha256_json

# Recipe sections / inputs each target leaves out of its key, and why they cannot change its outputs.
IGNORED_FACTORS: dict[str, dict[str, str]] = {
    "trtllm-engine": {
        "serve.*": "runtime parameters of the Triton model (KV fraction, scheduler policy, chunked context, ports)",
        "sla.*": "planning targets only",
        "hardware.memory_gb/hbm_gbps/tflops/*_gbps": "planner inputs; the engine depends on the GPU arch only",
        "parallel.pp_micro_batches": "not a TensorRT-LLM setting: its runtime keeps pp_size micro-batches in flight",
        "--workers, --out": "build parallelism and location do not change an engine",
    },
    "trtllm-llmapi": {
        "gpu_arch": "nothing is compiled: the LLM API compiles kernels at load time on the serving GPU",
        "sla.*": "planning targets only",
        "serve ports, instance counts": "Triton repository settings, written by the repo stage",
    },
    "reference": {
        "gpu_arch, tensorrt_llm version": "the reference runtime is PyTorch; nothing is compiled",
        "serve.*": "read by the runtime from the Triton model parameters, not from the engine",
        "sla.*": "planning targets only",
    },
}


class EngineManifest(StageManifest):
    """`engine/manifest.json`: what the build stage made, from what, and with which tools."""

    stage: str = "build"
    target: str = ""
    """trtllm-engine | trtllm-llmapi | reference."""
    factors: dict[str, Any] = Field(default_factory=dict)
    """Everything the cache key hashes (shown so a rebuild can say what changed)."""
    ignored_factors: dict[str, str] = Field(default_factory=dict)
    """Inputs deliberately left out of the key, each with the reason."""
    rank_keys: dict[str, str] = Field(default_factory=dict)
    """trtllm-engine: rank -> key of the rank{N}.engine built here."""
    build_config: dict[str, Any] = Field(default_factory=dict)
    """What the tool was asked for (limits + plugin choices); compared with the engine's config.json."""
    commands: list[list[str]] = Field(default_factory=list)
    """The exact commands that ran."""
    checkpoint_dir: str = ""
    trtllm_version: str | None = None
    """TensorRT-LLM version that built the engines (from the engine's config.json)."""
    gpu_compute_capability: str | None = None
    """Compute capability of the GPU the engines were built on, e.g. "9.0"."""
    gpu_name: str | None = None

    def mismatched_outputs_of(self, names, directory: str | Path, check_hash: bool = True) -> list[str]:
        """Those of `names` that are unrecorded, missing, or differ from their recorded sha256."""
        bad = []
        for rel in names:
            p = Path(directory) / rel
            digest = self.outputs.get(rel)
            if digest is None or not p.is_file() or (check_hash and sha256_file(p) != digest):
                bad.append(rel)
        return bad


def cache_key(factors: dict[str, Any]) -> str:
    return sha256_json(factors)


def rank_keys(common: dict[str, Any], checkpoint_outputs: dict[str, str], ranks) -> dict[str, str]:
    """Per-rank keys: the common factors + the sha256 of that rank's checkpoint file."""
    common_key = cache_key(common)
    return {str(r): cache_key({"common": common_key, "rank": r,
                               "rank_file": checkpoint_outputs.get(f"rank{r}.safetensors", "")})
            for r in ranks}


def changed_factors(old: EngineManifest | None, factors: dict[str, Any]) -> list[str]:
    """Names of the top-level factors that differ from the previous build (for the rebuild message)."""
    if old is None:
        return ["(no previous build)"]
    names = sorted(set(old.factors) | set(factors))
    return [n for n in names if old.factors.get(n) != factors.get(n)]


def stale_ranks(old: EngineManifest | None, keys: dict[str, str], engine_dir: str | Path,
                check_hash: bool = True) -> list[int]:
    """Ranks among `keys` whose engine is missing, altered, or was built with another key."""
    if old is None or old.target != "trtllm-engine":
        return sorted(int(r) for r in keys)
    stale = []
    for r, key in keys.items():
        name = f"rank{r}.engine"
        if old.rank_keys.get(r) != key or old.mismatched_outputs_of([name], engine_dir, check_hash):
            stale.append(int(r))
    return sorted(stale)


def is_fresh(old: EngineManifest | None, key: str, engine_dir: str | Path, check_hash: bool = True) -> bool:
    """The previous build had this key and its outputs are intact: nothing to do."""
    return old is not None and old.is_complete(engine_dir, key, check_hash)


def remove_stale_outputs(old: EngineManifest | None, keep, engine_dir: str | Path) -> list[str]:
    """Delete files a previous build (e.g. of another target) recorded that this build does not make."""
    if old is None:
        return []
    gone = []
    for rel in old.outputs:
        if rel not in keep and (Path(engine_dir) / rel).is_file():
            (Path(engine_dir) / rel).unlink()
            gone.append(rel)
    return gone


@dataclass(frozen=True)
class BuildResult:
    """What one `enginesmith build` did."""

    target: str
    engine_dir: Path
    skipped: bool
    """True when the cache key matched and the outputs were intact (nothing ran)."""
    changed: list[str] = field(default_factory=list)
    """Factors that differed from the previous build (empty when skipped)."""
    built: list[str] = field(default_factory=list)
    """Outputs (re)written by this run."""
