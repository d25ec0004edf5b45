"""`make_plan(recipe) -> Plan`: the recipe's intent resolved into a checked, explained layout.

Pure given the ModelSpec; without one it is loaded (shipped spec, local config.json, or the Hub).
"""

from __future__ import annotations

import dataclasses

from enginesmith.builders.planner.hardware import resolve_hardware
from enginesmith.builders.planner.layout_rules import check_recipe_layout, recipe_mapping
from enginesmith.builders.planner.layout_search import search_layouts
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.planner.plan_eval import evaluate
from enginesmith.builders.planner.plan_types import (
    Candidate,
    MemorySummary,
    PipelineInfo,
    Plan,
    QuantOption,
    RankPlan,
    SearchResult,
)
from enginesmith.builders.planner.quant_options import quantization_options
from enginesmith.builders.recipe import ParallelSection, Recipe

__all__ = ["make_plan", "Plan", "RankPlan", "MemorySummary", "PipelineInfo", "SearchResult", "Candidate",
           "QuantOption"]


def make_plan(recipe: Recipe, spec: ModelSpec | None = None, with_options: bool = True) -> Plan:
    """Resolve `recipe`; raises RecipeError when its layout or limits do not suit the model.

    `with_options=False` skips the what-if table of other weight quantizations (faster).
    """
    if spec is None:
        from enginesmith.builders.specs import resolve_spec

        spec = resolve_spec(recipe.model)
    check_recipe_layout(recipe, spec)
    hw = resolve_hardware(recipe.hardware)
    search = None
    if isinstance(recipe.parallel, ParallelSection):
        plan = evaluate(recipe, spec, hw, recipe_mapping(recipe.parallel, hw.gpus_per_node))
    else:
        plan, search = search_layouts(recipe, spec, hw)
    options = quantization_options(recipe, spec, hw, plan) if with_options else []
    return dataclasses.replace(plan, search=search, quantization_options=options)
