"""Limits and serving options of the reference engine, read from `engine/engine_config.json`.

The build target `reference` writes `{"target": "reference", "checkpoint_dir", "max_batch_size",
"max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width", "tokens_per_block", "dtype"}`;
the serving options (scheduler policy, KV cache size, ...) come from the Triton model's parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from enginesmith.runtime.engine.scheduler import POLICIES

ENGINE_CONFIG_NAME = "engine_config.json"


class EngineConfigError(ValueError):
    """An engine directory or option the reference runtime cannot use."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch_size: int = 64
    """Most requests in one iteration."""
    max_input_len: int = 1024
    """Longest prompt accepted."""
    max_seq_len: int = 2048
    """Longest prompt + output accepted."""
    max_num_tokens: int = 8192
    """Most tokens (prefill chunks + decode tokens) in one iteration."""
    max_beam_width: int = 1
    """Only 1 (no beam search) in the reference runtime."""
    tokens_per_block: int = 32
    """Positions per KV cache block."""
    dtype: str = "float32"
    """Weights, activations and KV cache: float32 | bfloat16 | float16."""
    pp_micro_batches: int = 1
    """Micro-batches each step is split into across pipeline stages (pp_size > 1)."""
    batch_scheduler_policy: str = "guaranteed_no_evict"
    """guaranteed_no_evict | max_utilization."""
    enable_chunked_context: bool = False
    """Split prompts longer than the token budget over several iterations."""
    enable_kv_cache_reuse: bool = False
    """Share the cached KV blocks of prompt prefixes between requests (prefix caching)."""
    max_tokens_in_paged_kv_cache: int | None = None
    """Upper bound on cached tokens (None: only memory and the batch limit bound it)."""
    kv_cache_free_gpu_mem_fraction: float = 0.9
    """Share of the free device memory the KV cache may take."""
    cancellation_check_period_ms: int = 100
    """How often `is_cancelled` callbacks are polled."""
    iteration_log_path: str | None = None
    """Append one JSON line per iteration here (None: keep the log in memory only)."""

    def __post_init__(self):
        positive = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block",
                    "pp_micro_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_input_len > self.max_seq_len:
            raise EngineConfigError(f"max_input_len={self.max_input_len} exceeds max_seq_len={self.max_seq_len}")
        if self.max_beam_width != 1:
            raise EngineConfigError(f"max_beam_width={self.max_beam_width}: the reference runtime has no beam search")
        if self.batch_scheduler_policy not in POLICIES:
            raise EngineConfigError(
                f"batch_scheduler_policy={self.batch_scheduler_policy!r}: choose one of {', '.join(POLICIES)}")
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise EngineConfigError(
                f"kv_cache_free_gpu_mem_fraction={self.kv_cache_free_gpu_mem_fraction} must be in (0, 1]")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise EngineConfigError(f"dtype={self.dtype!r}: choose float32, bfloat16 or float16")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides: Any) -> EngineConfig:
        """Known keys of `raw`, then `overrides` that are not None."""
        names = {f.name for f in fields(cls)}
        base = cls(**{k: v for k, v in raw.items() if k in names})
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def read_engine_dir(engine_dir: str | Path, **overrides: Any) -> tuple[EngineConfig, Path]:
    """Parse `engine_dir/engine_config.json` -> (config with overrides applied, checkpoint_dir)."""
    path = Path(engine_dir) / ENGINE_CONFIG_NAME
    if not path.is_file():
        raise EngineConfigError(
            f"{path} is missing: build the engine with target `reference` first (`enginesmith build RECIPE`)")
    raw = json.loads(path.read_text())
    if raw.get("target") != "reference":
        raise EngineConfigError(f"{path}: target={raw.get('target')!r}, the reference runtime needs 'reference'")
    if "checkpoint_dir" not in raw:
        raise EngineConfigError(f"{path} has no checkpoint_dir")
    ckpt = Path(raw["checkpoint_dir"])
    if not ckpt.is_absolute():
        ckpt = (Path(engine_dir) / ckpt).resolve()
    return EngineConfig.from_dict(raw, **overrides), ckpt


def serving_device(gpu_device_ids: str | None = None) -> str:
    """The device a served engine runs on: the first of `gpu_device_ids` (the model parameter: "0", "0,1" or
    "0;1") when CUDA is available, else the CPU. Call it in the process that will own the device."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    ids = (gpu_device_ids or "0").replace(";", ",").split(",")
    try:
        return f"cuda:{int(ids[0])}"
    except ValueError:
        raise EngineConfigError(f"gpu_device_ids={gpu_device_ids!r}: give GPU indices such as 0 or 0,1") from None
