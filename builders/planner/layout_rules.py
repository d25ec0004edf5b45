"""Which (tp, pp, moe_ep, moe_tp) layouts a model's shapes allow, with messages naming the recipe field."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.recipe import ParallelSection, Recipe, RecipeError


@dataclass(frozen=True, slots=True)
class Violation:
    field: str
    """Recipe field path, e.g. parallel.tp_size."""
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _tp_problem(spec: ModelSpec, tp: int) -> str | None:
    """Why TensorRT-LLM cannot split this model `tp` ways, or None."""
    nh, nkv = spec.num_attention_heads, spec.num_key_value_heads
    if nh % tp:
        return f"{tp} does not divide num_attention_heads={nh}"
    if not spec.is_mla and nkv % tp and tp % nkv:
        return f"{tp} neither divides nor is a multiple of num_key_value_heads={nkv}"
    if (not spec.is_moe or spec.first_k_dense_replace) and spec.intermediate_size % tp:
        return f"{tp} does not divide intermediate_size={spec.intermediate_size}"
    if spec.n_shared_experts and spec.shared_expert_intermediate_size % tp:
        return f"{tp} does not divide the shared experts' width {spec.shared_expert_intermediate_size}"
    return None


def _valid(values: range, ok: Callable[[int], bool]) -> str:
    found = [str(v) for v in values if ok(v)]
    return ", ".join(found) if found else "none"


def mapping_violations(spec: ModelSpec, m: Mapping, max_gpus: int | None = None) -> list[Violation]:
    """Every rule `m` breaks for `spec` (empty when TensorRT-LLM can run it)."""
    max_gpus = max_gpus or m.world_size
    out: list[Violation] = []
    if (why := _tp_problem(spec, m.tp_size)) is not None:
        valid = _valid(range(1, max_gpus + 1), lambda t: _tp_problem(spec, t) is None)
        out.append(Violation("parallel.tp_size", f"{why}; valid: {valid}"))
    if m.pp_size > spec.num_hidden_layers:
        out.append(Violation("parallel.pp_size", f"{m.pp_size} exceeds num_hidden_layers={spec.num_hidden_layers}; "
                                                 f"use at most {min(spec.num_hidden_layers, max_gpus)}"))
    if not spec.is_moe:
        if m.moe_ep_size != 1:
            out.append(Violation("parallel.moe_ep_size", f"{m.moe_ep_size} but {spec.name or spec.architecture} "
                                                         "is dense (no experts); remove moe_ep_size"))
        return out
    if spec.num_experts % m.moe_ep_size:
        valid = _valid(range(1, m.tp_size + 1), lambda e: m.tp_size % e == 0 and spec.num_experts % e == 0)
        out.append(Violation("parallel.moe_ep_size", f"{m.moe_ep_size} does not divide num_experts="
                                                     f"{spec.num_experts}; valid with tp_size={m.tp_size}: {valid}"))
    if spec.moe_intermediate_size % m.moe_tp_size:
        valid = _valid(range(1, m.tp_size + 1),
                       lambda t: m.tp_size % t == 0 and spec.moe_intermediate_size % t == 0)
        out.append(Violation("parallel.moe_tp_size", f"{m.moe_tp_size} does not divide moe_intermediate_size="
                                                     f"{spec.moe_intermediate_size}; valid: {valid}"))
    return out


def candidate_mappings(max_gpus: int, gpus_per_node: int = 8, moe: bool = True) -> Iterator[Mapping]:
    """Every structurally valid (tp, pp, moe_ep, moe_tp) with tp*pp <= max_gpus, before model rules; without
    `moe` (a dense model) only moe_ep_size 1, the one split its MLP has."""
    for tp in range(1, max_gpus + 1):
        for pp in range(1, max_gpus // tp + 1):
            for ep in (e for e in range(1, tp + 1) if tp % e == 0 and (moe or e == 1)):
                yield Mapping(world_size=tp * pp, tp_size=tp, pp_size=pp, moe_tp_size=tp // ep,
                              moe_ep_size=ep, gpus_per_node=gpus_per_node)


def valid_mappings(spec: ModelSpec, max_gpus: int, gpus_per_node: int = 8) -> list[Mapping]:
    """Layouts TensorRT-LLM can run for `spec` on up to `max_gpus` GPUs (dense models: moe_ep_size 1 only)."""
    return [m for m in candidate_mappings(max_gpus, gpus_per_node) if not mapping_violations(spec, m, max_gpus)]


def recipe_mapping(p: ParallelSection, gpus_per_node: int) -> Mapping:
    """The Mapping an explicit parallel section asks for (MoE split derived as TensorRT-LLM does)."""
    return Mapping.create(tp_size=p.tp_size, pp_size=p.pp_size, moe_ep_size=p.moe_ep_size,
                          moe_tp_size=p.moe_tp_size, gpus_per_node=gpus_per_node)


def recipe_violations(recipe: Recipe, spec: ModelSpec) -> list[Violation]:
    """Model-dependent problems of a recipe: its explicit layout and its sequence limits."""
    out: list[Violation] = []
    if recipe.build.max_seq_len > spec.max_position_embeddings:
        out.append(Violation("build.max_seq_len", f"{recipe.build.max_seq_len} exceeds the model's "
                                                  f"max_position_embeddings={spec.max_position_embeddings}; lower it"))
    if isinstance(recipe.parallel, ParallelSection):
        total = recipe.hardware.gpus_per_node * recipe.hardware.nodes
        p = recipe.parallel
        if not spec.is_moe and p.moe_tp_size not in (None, p.tp_size):
            out.append(Violation("parallel.moe_tp_size", f"{p.moe_tp_size} but {spec.name or spec.architecture} "
                                                         "is dense (no experts); remove moe_tp_size"))
            p = p.model_copy(update={"moe_tp_size": None})
        out += mapping_violations(spec, recipe_mapping(p, recipe.hardware.gpus_per_node), total)
    return out


def check_recipe_layout(recipe: Recipe, spec: ModelSpec) -> None:
    """Raise RecipeError listing every model-dependent problem of `recipe`."""
    if problems := recipe_violations(recipe, spec):
        raise RecipeError("\n".join(str(v) for v in problems))
