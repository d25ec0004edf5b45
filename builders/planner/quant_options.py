"""What each weight quantization would give on the recipe's hardware: refused (and why), fits, meets the SLA."""

from __future__ import annotations

from enginesmith.builders.planner.hardware import GIB, HardwareSpec, quantization_refusal
from enginesmith.builders.planner.layout_search import layout_name, search_layouts
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.planner.plan_eval import evaluate
from enginesmith.builders.planner.plan_types import Plan, QuantOption
from enginesmith.builders.recipe import ParallelSection, Recipe

WEIGHT_KINDS = ("none", "fp8", "int8_weight_only", "int4_weight_only")


def _option(kind: str, p: Plan) -> QuantOption:
    return QuantOption(weights=kind, runnable=True, reason=p.sla.summary,
                       layout=layout_name(p.mapping, p.spec.is_moe), gpus=p.world_size,
                       weight_gib_per_gpu=p.memory.weight_bytes_max / GIB, fits=p.memory.fits,
                       meets=p.sla.meets, tpot_ms=p.decode.estimate_ms)


def quantization_options(recipe: Recipe, spec: ModelSpec, hw: HardwareSpec, current: Plan) -> list[QuantOption]:
    """Every weight kind on the recipe's layout (or re-searched for `parallel: auto`); `current` is reused."""
    out = []
    for kind in WEIGHT_KINDS:
        if kind == recipe.quantization.weights:
            out.append(_option(kind, current))
            continue
        if (refusal := quantization_refusal(hw, kind, "none")) is not None:
            out.append(QuantOption(weights=kind, runnable=False, reason=refusal[1]))
            continue
        variant = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={"weights": kind})})
        if isinstance(recipe.parallel, ParallelSection):
            plan = evaluate(variant, spec, hw, current.mapping)
        else:
            plan = search_layouts(variant, spec, hw)[0]
        out.append(_option(kind, plan))
    return out
