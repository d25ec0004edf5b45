"""HF checkpoint -> TensorRT-LLM unified checkpoint (config.json + rank{N}.safetensors), streamed.

Modules: weight_map (declarative tables), split (index maths), rank_plan (per-rank read plans),
source (lazy HF reader), safetensors_stream + rank_writer (streaming output), quantize (weight-only),
config (config.json), validate (checks before writing), manifest, pipeline (`convert` / `convert_checkpoint`).
"""

from enginesmith.builders.convert.errors import ConvertError
from enginesmith.builders.convert.manifest import CheckpointManifest
from enginesmith.builders.convert.pipeline import ConvertResult, convert, convert_checkpoint

__all__ = ["CheckpointManifest", "ConvertError", "ConvertResult", "convert", "convert_checkpoint"]
