"""The recipe: one YAML file of deployment intent (model, hardware, parallelism, quantization, build, serve, SLA).

The recipe says what is wanted; `builders.planner.plan.make_plan` resolves it into a layout. Every section is
frozen and rejects unknown keys; every field is documented here, and `enginesmith recipe schema`
exports these docstrings as a JSON Schema for editor completion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, PositiveFloat, ValidationError, model_validator

from enginesmith.builders.planner.hardware import GPU_KINDS, ComputeDtype, quantization_refusal, resolve_hardware
from enginesmith.builders.recipe_errors import RecipeError, format_validation_error, rule
from enginesmith.builders.recipe_sections import BuildSection, Section, ServeSection, SlaSection

__all__ = ["Recipe", "RecipeError", "load_recipe", "ModelSection", "HardwareSection", "ParallelSection",
           "QuantizationSection", "BuildSection", "ServeSection", "SlaSection"]

Dtype = Literal["float32", "float16", "bfloat16"]
GpuName = Literal[GPU_KINDS]  # type: ignore[valid-type]


class ModelSection(Section):
    """Which checkpoint to deploy."""

    source: str = Field(min_length=1)
    """Hugging Face repo id (name or org/name) or a local folder holding config.json. A local path: it
    exists, starts with '/', '.' or '~', has more than one '/', is no valid repo id, or its first part is an
    existing folder (out/model while out/ exists); anything else is a repo id. Relative paths resolve against
    the current working directory, not the recipe's folder (`./out/model` is always a path)."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) to download; ignored for a local folder."""
    dtype: Dtype = "bfloat16"
    """Dtype of weights and activations: float32 | float16 | bfloat16."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own Python code when loading it with transformers."""
    spec: str | None = None
    """Name of a shipped model spec (builders/specs/*.json), so planning needs no network."""

    @model_validator(mode="after")
    def _known_spec(self) -> ModelSection:
        from enginesmith.builders.specs import shipped_names

        if self.spec is not None and self.spec not in shipped_names():
            raise rule("spec", f"{self.spec!r} is not a shipped spec; use one of {', '.join(shipped_names())} "
                               "or remove it to read <source>/config.json")
        return self

    def local_path(self) -> Path | None:
        """Absolute path when `source` is a local path (builders.model_source's rule), else None."""
        from enginesmith.builders.model_source import classify_source

        ref = classify_source(self.source)
        return ref.path.resolve() if ref.local else None


class HardwareSection(Section):
    """The GPUs and how they are wired."""

    gpu: GpuName = "H100"
    """Catalogue kind (A100-40, A100-80, H100, H200, L4, L40S, RTX4090, A10-24GB) or custom."""
    memory_gb: PositiveFloat | None = None
    """GPU memory in GiB as nvidia-smi reports it (required for custom)."""
    hbm_gbps: PositiveFloat | None = None
    """Memory bandwidth in GB/s (required for custom)."""
    tflops: dict[ComputeDtype, PositiveFloat] | None = None
    """Dense TFLOP/s per compute dtype (float32, float16, bfloat16, fp8, int8); required for custom."""
    fp8: bool | None = None
    """Whether the GPU has FP8 tensor cores (default: from the catalogue / compute capability >= 89)."""
    compute_capability: int | None = Field(default=None, ge=60, le=120)
    """SM version x10, e.g. 80 for A100 (default: from the catalogue; 80 for custom)."""
    gpus_per_node: int = Field(default=8, ge=1, le=72)
    """GPUs in one node (one NVLink/PCIe domain)."""
    nodes: int = Field(default=1, ge=1, le=64)
    """Number of nodes."""
    intra_node_link: Literal["nvlink", "pcie"] | None = None
    """Link between GPUs of a node (default: nvlink for SXM parts, pcie for L4/L40S/RTX4090/A10)."""
    intra_node_gbps: PositiveFloat | None = None
    """Intra-node bandwidth per GPU per direction in GB/s (default: the catalogue's)."""
    inter_node_link: Literal["infiniband", "ethernet"] = "infiniband"
    """Link between nodes."""
    inter_node_gbps: PositiveFloat | None = None
    """Inter-node bandwidth per GPU per direction in GB/s (default: 25 for A100, 50 for H100/H200)."""

    @model_validator(mode="after")
    def _custom_complete(self) -> HardwareSection:
        if self.gpu == "custom":
            for name in ("memory_gb", "hbm_gbps", "tflops"):
                if getattr(self, name) is None:
                    raise rule(name, "required when gpu is custom; give the GPU's figure "
                                     "(e.g. memory_gb: 80, hbm_gbps: 2039, tflops: {bfloat16: 312})")
        return self


class ParallelSection(Section):
    """An explicit TensorRT-LLM layout (TP innermost, then PP; EP carved out of TP)."""

    tp_size: int = Field(default=1, ge=1)
    """Tensor-parallel ranks: split heads, MLP width and the lm_head."""
    pp_size: int = Field(default=1, ge=1)
    """Pipeline stages: split the layers (first stages get the extra layer)."""
    moe_ep_size: int | None = Field(default=None, ge=1)
    """Expert-parallel ranks within the TP group (whole experts per rank); default derived from moe_tp_size."""
    moe_tp_size: int | None = Field(default=None, ge=1)
    """Ranks splitting each expert's width; moe_tp_size * moe_ep_size == tp_size (default: tp_size)."""
    pp_micro_batches: int | None = Field(default=None, ge=1)
    """Micro-batches a batch is split into through the pipeline (bubble (p-1)/(m+p-1)); default 4 * pp_size
    capped by the batch."""

    @model_validator(mode="after")
    def _moe_split(self) -> ParallelSection:
        ep, mtp, tp = self.moe_ep_size, self.moe_tp_size, self.tp_size
        if ep is not None and mtp is not None and ep * mtp != tp:
            raise rule("moe_tp_size", f"moe_tp_size*moe_ep_size={mtp}*{ep}={mtp * ep} must equal tp_size={tp}; "
                                      f"set moe_tp_size: {tp // ep if tp % ep == 0 else 'a divisor of tp_size'}")
        for name, v in (("moe_ep_size", ep), ("moe_tp_size", mtp)):
            if v is not None and tp % v:
                valid = ", ".join(str(d) for d in range(1, tp + 1) if tp % d == 0)
                raise rule(name, f"{v} does not divide tp_size={tp}; valid: {valid}")
        return self

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


class QuantizationSection(Section):
    """How weights and the KV cache are stored."""

    weights: Literal["none", "fp8", "int8_weight_only", "int4_weight_only"] = "none"
    """none | fp8 (FP8 weights and GEMMs, SM89+) | int8_weight_only (W8A16) | int4_weight_only (W4A16)."""
    kv_cache: Literal["none", "fp8"] = "none"
    """none (KV in model.dtype) | fp8 (FP8 KV cache, SM89+)."""


class Recipe(Section):
    """One deployment: model -> plan -> checkpoint -> engine -> Triton repository -> benchmark."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    """Folder name of this deployment under --out (letters, digits, '.', '_', '-')."""
    model: ModelSection
    """The checkpoint."""
    hardware: HardwareSection = HardwareSection()
    """The GPUs."""
    parallel: Literal["auto"] | ParallelSection = "auto"
    """'auto' (search every valid layout; cheapest that meets the SLA wins) or an explicit layout."""
    quantization: QuantizationSection = QuantizationSection()
    """Weight and KV-cache quantization."""
    build: BuildSection = BuildSection()
    """Engine limits and the build target."""
    serve: ServeSection = ServeSection()
    """Triton serving options."""
    sla: SlaSection = SlaSection()
    """Latency targets and load the plan is checked against."""

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        hw = resolve_hardware(self.hardware)
        if (refusal := quantization_refusal(hw, self.quantization.weights, self.quantization.kv_cache)):
            raise rule(*refusal)
        dtypes_needed = {"fp8"} if self.quantization.weights == "fp8" else {self.model.dtype}
        if missing := sorted(dtypes_needed - set(hw.tflops)):
            raise rule("hardware.tflops", f"has no figure for {missing[0]} (model.dtype / quantization); "
                                          f"add {missing[0]}: <TFLOP/s>")
        if isinstance(self.parallel, ParallelSection) and self.parallel.world_size > hw.total_gpus:
            raise rule("parallel", f"tp_size*pp_size={self.parallel.world_size} exceeds the {hw.total_gpus} GPUs of "
                                   f"hardware (gpus_per_node {hw.gpus_per_node} x nodes {hw.nodes}); "
                                   "lower tp_size/pp_size or add nodes")
        b, s = self.build, self.sla
        if isinstance(self.parallel, ParallelSection) and (self.parallel.pp_micro_batches or 0) > b.max_batch_size:
            raise rule("parallel.pp_micro_batches", f"{self.parallel.pp_micro_batches} exceeds "
                       f"build.max_batch_size={b.max_batch_size}; each micro-batch needs a sequence")
        if not self.serve.enable_chunked_context and b.max_num_tokens < b.max_input_len:
            raise rule("build.max_num_tokens", f"{b.max_num_tokens} < build.max_input_len={b.max_input_len}: a "
                       "whole prompt must fit one step; raise it or set serve.enable_chunked_context: true")
        if s.isl > b.max_input_len:
            raise rule("sla.isl", f"{s.isl} exceeds build.max_input_len={b.max_input_len}; lower isl or raise it")
        if s.isl + s.osl > b.max_seq_len:
            raise rule("sla.osl", f"isl+osl={s.isl + s.osl} exceeds build.max_seq_len={b.max_seq_len}; "
                                  "lower them or raise max_seq_len")
        return self


def parse_recipe(data: object) -> Recipe:
    """Validate a dict (already parsed YAML) into a Recipe, raising RecipeError with field paths."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: must be a mapping of sections (name, model, hardware, ...), "
                          f"got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, Recipe)) from None


def load_recipe(path: str | Path, check_model: bool = True) -> Recipe:
    """Read and validate a YAML recipe; with `check_model`, also check the layout against the model's
    shapes when the spec is available without network (shipped, or a local config.json)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    recipe = parse_recipe(data)
    if check_model:
        from enginesmith.builders.planner.layout_rules import check_recipe_layout
        from enginesmith.builders.specs import resolve_spec_offline

        spec = resolve_spec_offline(recipe.model)
        if spec is not None:
            check_recipe_layout(recipe, spec)
    return recipe
