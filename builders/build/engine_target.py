"""Build target `trtllm-engine`: plan the trtllm-build commands, skip what is cached, run, verify, record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from enginesmith.builders.build.cache import (
    IGNORED_FACTORS,
    BuildResult,
    EngineManifest,
    cache_key,
    changed_factors,
    rank_keys,
    remove_stale_outputs,
    stale_ranks,
)
from enginesmith.builders.build.checkpoint import validate_checkpoint
from enginesmith.builders.build.engine_check import installed_trtllm_version, local_gpus, verify_engine_dir
from enginesmith.builders.build.flags import (
    BuildCommand,
    FlagChoice,
    build_command,
    build_options,
    choose_flags,
    per_node_commands,
)
from enginesmith.builders.build.gpu import GpuArch, gpu_arch_of
from enginesmith.builders.build.trtllm_engine import require_trtllm, run_build, runner_argv
from enginesmith.builders.manifest import sha256_file, tool_versions

TARGET = "trtllm-engine"


class GpuMismatchError(RuntimeError):
    """The local GPU is not the architecture the recipe targets."""


@dataclass(frozen=True)
class EngineBuildPlan:
    """Everything `--dry-run` / `--explain` show, computed from the recipe and plan alone."""

    gpu: GpuArch
    choices: list[FlagChoice]
    command: BuildCommand
    """The command for the requested ranks (default: all ranks, here)."""
    per_node: list[BuildCommand] = field(default_factory=list)
    """Multi-node layouts: the command each node runs for its own ranks."""


def plan_engine_build(recipe, plan, ckpt_dir, engine_dir, ranks=None, workers=None) -> EngineBuildPlan:
    gpu = gpu_arch_of(recipe.hardware)
    choices = choose_flags(recipe, plan, gpu, str(ckpt_dir), str(engine_dir))
    per_node = per_node_commands(choices, plan)
    return EngineBuildPlan(gpu, choices, build_command(choices, plan, ranks, workers),
                           per_node if len(per_node) > 1 else [])


def _local_arch(gpu: GpuArch) -> tuple[str, str]:
    gpus = local_gpus()
    if not gpus:
        raise GpuMismatchError("no NVIDIA GPU is visible (nvidia-smi found none): trtllm-build needs one of "
                               f"the target architecture, {gpu.label}")
    here = gpus[0]
    if gpu.compute_capability and here.compute_capability != gpu.compute_capability:
        raise GpuMismatchError(
            f"the recipe targets {gpu.label} but this machine's GPU is {here.name} (compute capability "
            f"{here.compute_capability}); engines only run on the architecture they were built on: build on "
            "the target GPU or change hardware.gpu")
    return here.compute_capability, here.name


def build_trtllm_engine(recipe, plan, ckpt_dir, engine_dir, ranks=None, workers=None) -> BuildResult:
    """Build the stale engine ranks among `ranks` (default all) and record them; skip when all are fresh."""
    ckpt_dir, engine_dir = Path(ckpt_dir), Path(engine_dir)
    bp = plan_engine_build(recipe, plan, ckpt_dir, engine_dir, ranks, workers)
    require_trtllm()
    ckpt_manifest = validate_checkpoint(ckpt_dir, plan.mapping, ranks=bp.command.ranks, check_hash=False)
    cc, gpu_name = _local_arch(bp.gpu)
    options = build_options(bp.choices)
    factors = {"target": TARGET, "checkpoint_config": ckpt_manifest.outputs["config.json"],
               "build_options": options, "tensorrt_llm": installed_trtllm_version(), "gpu_arch": cc}
    keys = rank_keys(factors, ckpt_manifest.outputs, bp.command.ranks)
    old = EngineManifest.read(engine_dir)
    stale = stale_ranks(old, keys, engine_dir, check_hash=False)
    if not stale and old is not None and not old.mismatched_outputs_of(["config.json"], engine_dir, False):
        return BuildResult(TARGET, engine_dir, skipped=True)
    stale = stale or [bp.command.ranks[0]]  # only config.json is missing: rebuild one rank to rewrite it
    cmd = build_command(bp.choices, plan, tuple(stale), workers)
    run_build(cmd)
    config = verify_engine_dir(engine_dir, stale, plan.mapping, options, recipe.model.dtype)
    names = ["config.json"] + [f"rank{r}.engine" for r in bp.command.ranks]
    remove_stale_outputs(old, set(names), engine_dir)
    EngineManifest(
        target=TARGET, key=cache_key(keys), factors=factors, ignored_factors=IGNORED_FACTORS[TARGET],
        inputs={"checkpoint": ckpt_manifest.digest()}, versions=tool_versions("tensorrt_llm"),
        outputs={n: sha256_file(engine_dir / n) for n in names}, rank_keys=keys, build_config=options,
        commands=[runner_argv(cmd)], checkpoint_dir=str(ckpt_dir.resolve()),
        trtllm_version=str(config.get("version") or installed_trtllm_version()),
        gpu_compute_capability=cc, gpu_name=gpu_name,
    ).write(engine_dir)
    return BuildResult(TARGET, engine_dir, skipped=False, changed=changed_factors(old, factors),
                       built=[f"rank{r}.engine" for r in stale])
