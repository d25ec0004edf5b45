"""Checks on a built engine directory, and the refusal to serve an engine on the wrong GPU or version.

Nothing here imports tensorrt_llm: the serving side calls `check_engine_compatible` before launch,
passing the GPU / TensorRT-LLM version it will run with (or letting them be detected).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from enginesmith.builders.build.cache import EngineManifest

TRTLLM_DISTRIBUTIONS = ("tensorrt_llm", "tensorrt-llm")
LIMIT_KEYS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width")


class EngineCheckError(RuntimeError):
    """The engine directory is incomplete or was built with other settings than asked."""


class EngineCompatibilityError(RuntimeError):
    """The engine was built for another GPU architecture or TensorRT-LLM version than this machine has."""


@dataclass(frozen=True, slots=True)
class LocalGpu:
    name: str
    compute_capability: str


def local_gpus() -> list[LocalGpu]:
    """GPUs visible through nvidia-smi (empty when there is no NVIDIA driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, cc = line.rpartition(",")
        if name.strip():
            gpus.append(LocalGpu(name.strip(), cc.strip()))
    return gpus


def installed_trtllm_version() -> str | None:
    """Version of the TensorRT-LLM this Python imports: its distribution's metadata, else the `__version__` of
    its `tensorrt_llm/version.py` (a source build on PYTHONPATH); read without importing it (the import
    initialises CUDA). None when it is not installed."""
    for dist in TRTLLM_DISTRIBUTIONS:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    spec = importlib.util.find_spec("tensorrt_llm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "version.py"
        if path.is_file() and (m := re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", path.read_text(),
                                               re.MULTILINE)):
            return m.group(1)
    return None


def trtllm_location() -> Path | None:
    """The folder `tensorrt_llm` is imported from (no import)."""
    spec = importlib.util.find_spec("tensorrt_llm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _same_setting(asked: str, built, dtype: str) -> bool:
    if asked == "enable":
        return built is True or built == "enable"
    if asked == "disable":
        return built in (False, None, "disable")
    if asked == "auto":
        return built in ("auto", dtype)
    if isinstance(built, str) and "." in built:  # enum names such as "KVCacheType.PAGED"
        built = built.rsplit(".", 1)[1]
    return str(built).lower() == str(asked).lower()


def build_config_differences(asked: dict, engine_config: dict, dtype: str) -> list[str]:
    """`flag: asked X, engine has Y` for every asked setting the engine's config.json disagrees with."""
    bc = engine_config.get("build_config", {})
    plugins = bc.get("plugin_config", {})
    diffs = []
    for name, want in asked.items():
        if name in ("workers", "use_fused_mlp"):  # not stored in the engine's build_config
            continue
        if name in LIMIT_KEYS:
            got = bc.get(name)
            same = got == int(want)
        elif name == "kv_cache_type":
            got = bc.get(name)
            same = _same_setting(want, got, dtype)
        else:
            got = plugins.get(name, "<absent>")
            same = _same_setting(want, got, dtype)
        if not same:
            diffs.append(f"{name}: asked {want}, engine has {got}")
    return diffs


def verify_engine_dir(engine_dir: str | Path, ranks, mapping, asked: dict, dtype: str) -> dict:
    """Check config.json, one rank{N}.engine per rank, the mapping and the build config; return config.json."""
    engine_dir = Path(engine_dir)
    cfg_path = engine_dir / "config.json"
    if not cfg_path.is_file():
        raise EngineCheckError(f"{cfg_path} is missing: trtllm-build did not finish")
    config = json.loads(cfg_path.read_text())
    missing = [f"rank{r}.engine" for r in ranks if not (engine_dir / f"rank{r}.engine").is_file()]
    if missing:
        raise EngineCheckError(f"{engine_dir}: {', '.join(missing)} missing after trtllm-build")
    got_map = config.get("pretrained_config", {}).get("mapping", {})
    for k in ("world_size", "tp_size", "pp_size"):
        if got_map.get(k) != getattr(mapping, k):
            raise EngineCheckError(f"{cfg_path}: mapping.{k}={got_map.get(k)}, plan has {getattr(mapping, k)}")
    diffs = build_config_differences(asked, config, dtype)
    if diffs:
        raise EngineCheckError(f"{cfg_path}: the engine was not built as asked: " + "; ".join(diffs))
    return config


def check_engine_compatible(engine_dir: str | Path, gpu_compute_capability: str | None = None,
                            gpu_name: str | None = None, trtllm_version: str | None = None) -> EngineManifest:
    """Refuse (EngineCompatibilityError) to serve an engine built for another GPU arch or TensorRT-LLM.

    Values not given are detected on this machine (nvidia-smi, installed package metadata).
    Targets other than `trtllm-engine` compile nothing and always pass.
    """
    manifest = EngineManifest.read(engine_dir)
    if manifest is None:
        raise EngineCompatibilityError(f"no engine manifest in {engine_dir}: run `enginesmith build RECIPE` first")
    if manifest.target != "trtllm-engine":
        return manifest
    built_for = f"compute capability {manifest.gpu_compute_capability} ({manifest.gpu_name})"
    if gpu_compute_capability is None:
        gpus = local_gpus()
        if not gpus:
            raise EngineCompatibilityError(f"engine in {engine_dir} needs a GPU of {built_for}; "
                                           "no NVIDIA GPU is visible here")
        gpu_compute_capability, gpu_name = gpus[0].compute_capability, gpus[0].name
    if gpu_compute_capability != manifest.gpu_compute_capability:
        raise EngineCompatibilityError(
            f"engine in {engine_dir} was built for GPU {built_for}, but this GPU is compute capability "
            f"{gpu_compute_capability} ({gpu_name or 'unknown'}); rebuild it on the serving GPU")
    here = trtllm_version or installed_trtllm_version()
    if here is None:
        raise EngineCompatibilityError(
            f"engine in {engine_dir} was built with TensorRT-LLM {manifest.trtllm_version}, and this Python has no "
            "TensorRT-LLM to serve it: run `enginesmith repo/serve` where it is installed (NVIDIA's container, "
            "with `make venv` there)")
    if here != manifest.trtllm_version:
        raise EngineCompatibilityError(
            f"engine in {engine_dir} was built with TensorRT-LLM {manifest.trtllm_version}, but the serving "
            f"side has TensorRT-LLM {here or 'not installed'}; rebuild it with the serving version")
    return manifest
