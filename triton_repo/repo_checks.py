"""What the repository writer must know about the built engine, and the checks made before writing.

Each target's engine directory (docs/ARCHITECTURE.md) is read into one `EngineFacts`:
- reference:      engine/engine_config.json (limits; prompts are chunked natively, so chunked context is fine);
- trtllm-engine:  engine/config.json (build_config, plugin_config, pretrained_config.mapping) + rank{N}.engine;
- trtllm-llmapi:  engine/model.yaml (LLM() arguments; the PyTorch backend chunks and reuses natively).
Every check raises `RepoError` naming the recipe field (or file) and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class RepoError(ValueError):
    """The recipe, engine or tokenizer cannot make a working Triton model repository."""


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """The engine-side limits and features the Triton configuration must agree with."""

    target: str
    max_batch_size: int
    max_beam_width: int
    paged_context_fmha: bool
    """Built with use_paged_context_fmha (needed for chunked context and KV-cache reuse)."""
    tp_size: int | None
    pp_size: int | None
    rank_files: int | None
    """rank{N}.engine files present (trtllm-engine only)."""
    source: Path
    """The file the facts were read from (named in error messages)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RepoError(f"{path}: cannot read it as JSON ({e}); rebuild with `enginesmith build RECIPE`") from None


def _missing(path: Path, target: str) -> RepoError:
    return RepoError(f"{path} is missing: build target {target} first (`enginesmith build RECIPE`)")


def read_engine_facts(engine_dir: str | Path, target: str) -> EngineFacts:
    """Read the engine directory of `target` (reference | trtllm-engine | trtllm-llmapi)."""
    d = Path(engine_dir)
    if target == "reference":
        path = d / "engine_config.json"
        if not path.is_file():
            raise _missing(path, target)
        raw = _read_json(path)
        if raw.get("target") != "reference":
            raise RepoError(f"{path}: target={raw.get('target')!r} but build.target is reference; rebuild")
        return EngineFacts(target, int(raw["max_batch_size"]), int(raw.get("max_beam_width", 1)), True,
                           None, None, None, path)
    if target == "trtllm-engine":
        path = d / "config.json"
        if not path.is_file():
            raise _missing(path, target)
        raw = _read_json(path)
        bc, mapping = raw.get("build_config", {}), raw.get("pretrained_config", {}).get("mapping", {})
        plugins = bc.get("plugin_config", {})
        ranks = len(list(d.glob("rank*.engine")))
        return EngineFacts(target, int(bc.get("max_batch_size", 0)), int(bc.get("max_beam_width", 1)),
                           bool(plugins.get("use_paged_context_fmha", False)), mapping.get("tp_size"),
                           mapping.get("pp_size"), ranks, path)
    if target == "trtllm-llmapi":
        import yaml

        path = d / "model.yaml"
        if not path.is_file():
            raise _missing(path, target)
        raw = yaml.safe_load(path.read_text()) or {}
        return EngineFacts(target, int(raw.get("max_batch_size", 0)), int(raw.get("max_beam_width", 1)), True,
                           raw.get("tensor_parallel_size"), raw.get("pipeline_parallel_size"), None, path)
    raise RepoError(f"build.target={target!r}: use reference, trtllm-engine or trtllm-llmapi")


def check_tokenizer(tokenizer_dir: str | Path) -> None:
    d = Path(tokenizer_dir)
    if not d.is_dir() or not any((d / name).is_file() for name in TOKENIZER_MARKERS):
        raise RepoError(f"tokenizer_dir {d} has no tokenizer ({' / '.join(TOKENIZER_MARKERS)}): "
                        "`enginesmith convert RECIPE` copies it to checkpoint/tokenizer")


def check_serve_options(serve, engine: EngineFacts, streaming_because: str | None) -> None:
    """The recipe's serve section against the engine it will run (`streaming_because`: why streaming is needed)."""
    if not 0.0 < serve.kv_cache_free_gpu_mem_fraction <= 1.0:
        raise RepoError(f"serve.kv_cache_free_gpu_mem_fraction={serve.kv_cache_free_gpu_mem_fraction} must be "
                        "in (0, 1]: it is the share of free GPU memory the KV cache takes (e.g. 0.9)")
    if serve.triton_max_batch_size > engine.max_batch_size:
        raise RepoError(f"serve.triton_max_batch_size={serve.triton_max_batch_size} exceeds the engine's "
                        f"max_batch_size={engine.max_batch_size} ({engine.source}); lower it to "
                        f"{engine.max_batch_size} or rebuild with a larger build.max_batch_size")
    if streaming_because and not serve.decoupled:
        raise RepoError(f"{streaming_because}: streaming needs serve.decoupled: true (each token is a response "
                        "of a decoupled model); set it")
    for field in ("enable_chunked_context", "enable_kv_cache_reuse"):
        if getattr(serve, field) and not engine.paged_context_fmha:
            raise RepoError(f"serve.{field}: true needs an engine built with use_paged_context_fmha, but "
                            f"{engine.source} has it off; rebuild with --use_paged_context_fmha enable or set "
                            f"serve.{field}: false")


def check_layout(mapping, engine: EngineFacts, ranks: tuple[int, ...] | None = None) -> None:
    """World size == tp*pp, and the engine was built for the plan's layout.

    `ranks`: the engine ranks this node holds (a multi-node layout without a shared filesystem); None: all.
    """
    if mapping.world_size != mapping.tp_size * mapping.pp_size:
        raise RepoError(f"world_size={mapping.world_size} must equal tp_size*pp_size="
                        f"{mapping.tp_size * mapping.pp_size} (leader mode runs one rank per GPU)")
    for name, got in (("tp_size", engine.tp_size), ("pp_size", engine.pp_size)):
        if got is not None and int(got) != getattr(mapping, name):
            raise RepoError(f"{engine.source}: {name}={got} but the plan has {name}={getattr(mapping, name)}; "
                            "rebuild the engine for this recipe's layout")
    if engine.rank_files is None:
        return
    if ranks is not None:
        missing = [f"rank{r}.engine" for r in ranks if not (engine.source.parent / f"rank{r}.engine").is_file()]
        if missing:
            listed = ",".join(map(str, ranks))
            raise RepoError(f"{engine.source.parent} lacks {', '.join(missing)} of --ranks {listed}; run "
                            f"`enginesmith build RECIPE --ranks {listed}` on this node first")
    elif engine.rank_files != mapping.world_size:
        raise RepoError(f"{engine.source.parent} holds {engine.rank_files} rank*.engine files but the plan has "
                        f"world_size={mapping.world_size}; rebuild the engine, or give --ranks with this node's "
                        "ranks when each node holds only its own")


def check_engine_target(engine_dir: str | Path, target: str, gpu_compute_capability: str | None,
                        trtllm_version: str | None) -> None:
    """The engine directory was built for this recipe's target, GPU architecture and TensorRT-LLM version.

    The manifest is optional (an engine built by hand has none); when present it must agree.
    """
    from enginesmith.builders.build.cache import EngineManifest

    manifest = EngineManifest.read(engine_dir)
    if manifest is None:
        return
    if manifest.target and manifest.target != target:
        raise RepoError(f"{Path(engine_dir) / 'manifest.json'}: built for target {manifest.target}, but "
                        f"build.target is {target}; run `enginesmith build RECIPE`")
    if target != "trtllm-engine":
        return
    from enginesmith.builders.build.engine_check import EngineCompatibilityError, check_engine_compatible

    try:
        check_engine_compatible(engine_dir, gpu_compute_capability, None, trtllm_version)
    except EngineCompatibilityError as e:
        raise RepoError(str(e)) from None


def serving_trtllm_version() -> str | None:
    """TensorRT-LLM of the serving side: the installed one (None when this Python has none)."""
    from enginesmith.builders.build.engine_check import installed_trtllm_version

    return installed_trtllm_version()
