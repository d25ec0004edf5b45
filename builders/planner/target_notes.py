"""What a plan must say about deploying on its build target: facts of the target and of the checkpoint.

Notes explain (e.g. which pipeline micro-batches the target really runs, where files go on several nodes);
warnings name something the user must act on before it can serve (custom code, FP8 weights on a GPU
without FP8, a checkpoint the LLM API needs quantized beforehand).
"""

from __future__ import annotations

import json

from enginesmith.builders.planner.hardware import HardwareSpec
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.recipe import ParallelSection, Recipe

TRTLLM_TARGETS = ("trtllm-engine", "trtllm-llmapi")


def runtime_micro_batches(recipe: Recipe, pp_size: int) -> int | None:
    """Micro-batches the target's runtime splits a batch into, when the recipe cannot choose them.

    TensorRT-LLM has no such setting: its runtime keeps pp_size micro-batches in flight. Only the reference
    runtime honours `parallel.pp_micro_batches` (None: the plan picks).
    """
    return pp_size if recipe.build.target in TRTLLM_TARGETS else None


def custom_code(recipe: Recipe) -> str | None:
    """What code the checkpoint runs through `trust_remote_code` (shipped spec or local tokenizer), if any."""
    from enginesmith.builders.specs import name_for_repo, shipped_entry

    name = recipe.model.spec or name_for_repo(recipe.model.source)
    if name and (what := shipped_entry(name).get("remote_code")):
        return what
    local = recipe.model.local_path()
    tok_cfg = local / "tokenizer_config.json" if local is not None else None
    if tok_cfg is not None and tok_cfg.is_file():
        auto_map = json.loads(tok_cfg.read_text()).get("auto_map") or {}
        if "AutoTokenizer" in auto_map:
            return f"the tokenizer is custom code ({auto_map['AutoTokenizer']}) shipped with the checkpoint"
    return None


def _notes(recipe: Recipe, m: Mapping, hw: HardwareSpec) -> list[str]:
    out = []
    fixed = runtime_micro_batches(recipe, m.pp_size)
    asked = recipe.parallel.pp_micro_batches if isinstance(recipe.parallel, ParallelSection) else None
    if m.pp_size > 1 and fixed is not None:
        out.append(f"{recipe.build.target}: TensorRT-LLM keeps pp_size={fixed} micro-batches in flight (it has no "
                   "micro-batch setting); the pipeline bubble is given for that"
                   + (f"; parallel.pp_micro_batches={asked} applies to the reference runtime only" if asked else ""))
    nodes = len({c.node for c in m.ranks()})
    if nodes > 1 and recipe.build.target == "trtllm-engine":
        out.append(f"{nodes} nodes: mpirun starts every rank with the same paths, so --out must be at the same "
                   "path on every node: a shared filesystem (node 0 runs convert, build and repo for all ranks), or "
                   "a local directory per node at that path (each node runs convert, build and repo with "
                   "--ranks of its own ranks); `enginesmith build RECIPE --dry-run` lists each node's ranks")
    return out


def _warnings(recipe: Recipe, spec: ModelSpec, hw: HardwareSpec) -> list[str]:
    out = []
    source, code = recipe.model.source, custom_code(recipe)
    if recipe.model.trust_remote_code:
        out.append(f"model.trust_remote_code: true runs Python code from {source} ({code or 'tokenizer/model code'})"
                   " in the serving processes: review it and pin model.revision to a commit")
    elif code:
        out.append(f"{source}: {code}; set model.trust_remote_code: true (after reviewing that code), or the "
                   "tokenizer will not load")
    if spec.published_quant == "fp8" and not hw.fp8:
        out.append(f"{source} is published with FP8 weights (quantization_config.quant_method=fp8) and "
                   f"{hw.gpu} (SM{hw.sm}) has no FP8: it cannot be served as published; convert it to "
                   f"{recipe.model.dtype} first and quantize from that copy")
    if recipe.build.target == "trtllm-llmapi":
        from enginesmith.builders.build.llmapi import prequantized_checkpoint_note

        if note := prequantized_checkpoint_note(recipe):
            out.append(note)
    return out


def target_notes(recipe: Recipe, spec: ModelSpec, m: Mapping, hw: HardwareSpec) -> tuple[list[str], list[str]]:
    """(notes, warnings) of deploying `recipe` on layout `m`."""
    return _notes(recipe, m, hw), _warnings(recipe, spec, hw)
