"""Build stage: converted checkpoint -> what the serving side runs, per recipe target.

Targets: `trtllm-engine` (trtllm-build engines, TensorRT-LLM 1.2.x; `engine_target`, `flags`,
`trtllm_engine`), `trtllm-llmapi` (LLM-API YAML for TensorRT-LLM >= 1.0; `llmapi`) and `reference`
(engine_config.json for the PyTorch runtime; `reference`). Every target writes `engine/manifest.json`
(`cache.EngineManifest`) and skips work whose cache key is unchanged (`cache`).
The serving side calls `check_engine_compatible(engine_dir)` before launch.
"""

from enginesmith.builders.build.cache import BuildResult, EngineManifest
from enginesmith.builders.build.engine_check import EngineCompatibilityError, check_engine_compatible

__all__ = ["BuildResult", "EngineCompatibilityError", "EngineManifest", "check_engine_compatible"]
