"""`parallel: auto`: score every valid layout, pick the cheapest (fewest GPUs) that meets the SLA, then the
fastest (lowest TPOT, then TTFT), and explain the runners-up."""

from __future__ import annotations

from enginesmith.builders.planner.hardware import HardwareSpec
from enginesmith.builders.planner.layout_rules import candidate_mappings, mapping_violations
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.planner.plan_eval import evaluate
from enginesmith.builders.planner.plan_types import Candidate, Plan, SearchResult
from enginesmith.builders.recipe import Recipe
from enginesmith.builders.planner.sla import CHECK_ORDER

MAX_CHEAPER_SHOWN = 5
MAX_SAME_SIZE_SHOWN = 3


def layout_name(m: Mapping, moe: bool) -> str:
    name = f"tp{m.tp_size} pp{m.pp_size}"
    return name + f" ep{m.moe_ep_size} mtp{m.moe_tp_size}" if moe else name


def layout_sizes(m: Mapping, moe: bool) -> str:
    """'tp_size=2 pp_size=1', plus the expert split for a MoE model (a dense one has none)."""
    sizes = f"tp_size={m.tp_size} pp_size={m.pp_size}"
    return sizes + f" moe_ep_size={m.moe_ep_size} moe_tp_size={m.moe_tp_size}" if moe else sizes


def _cost_key(p: Plan) -> tuple:
    """Cost first (GPUs), then latency (TPOT, TTFT), then the simpler layout: less PP, then less EP (the
    planner prices EP/TP splits of the MoE block alike, but whole experts per rank load the ranks as unevenly
    as the routing does)."""
    return (p.world_size, round(p.decode.estimate_ms, 4), round(p.prefill.estimate_ms, 4),
            p.mapping.pp_size, p.mapping.moe_ep_size)


def _closeness_key(p: Plan) -> tuple:
    """For layouts that miss: the one failing the latest check, by the smallest margin, is closest."""
    failed = [c for c in p.sla.checks if not c.ok]
    first = CHECK_ORDER.index(failed[0].name) if failed else len(CHECK_ORDER)
    margin = failed[0].usage if failed else 0.0
    return (-first, margin, p.world_size)


def _reason(p: Plan, best: Plan) -> str:
    if not p.sla.meets:
        return p.sla.summary.removeprefix("misses the SLA: ")
    if p.world_size > best.world_size:
        return (f"meets the SLA but needs {p.world_size} GPUs (chosen: {best.world_size}); TPOT "
                f"{p.decode.estimate_ms:,.1f} ms vs {best.decode.estimate_ms:,.1f} ms")
    if _cost_key(p)[:3] == _cost_key(best)[:3]:
        if p.mapping.pp_size != best.mapping.pp_size:
            return "ties with the chosen layout (same TPOT and TTFT); ties go to fewer pipeline stages"
        return ("ties with the chosen layout (the MoE block is one TP all-reduce whatever the EP/TP split); "
                "ties go to less EP")
    return (f"meets the SLA on {p.world_size} GPUs but TPOT {p.decode.estimate_ms:,.2f} ms / TTFT "
            f"{p.prefill.estimate_ms:,.1f} ms vs {best.decode.estimate_ms:,.2f} / {best.prefill.estimate_ms:,.1f}")


def candidate(p: Plan, reason: str) -> Candidate:
    m, moe = p.mapping, p.spec.is_moe
    return Candidate(layout=layout_name(m, moe), gpus=m.world_size, tp_size=m.tp_size, pp_size=m.pp_size,
                     moe_ep_size=m.moe_ep_size if moe else None, moe_tp_size=m.moe_tp_size if moe else None,
                     meets=p.sla.meets, fits=p.memory.fits, tpot_ms=p.decode.estimate_ms,
                     ttft_ms=p.prefill.estimate_ms, binding=p.sla.binding, reason=reason)


def _runners_up(plans: list[Plan], best: Plan) -> list[Plan]:
    by_size: dict[int, list[Plan]] = {}
    for p in plans:
        if p is not best:
            by_size.setdefault(p.world_size, []).append(p)
    order = lambda ps: sorted(ps, key=lambda p: (not p.sla.meets, _cost_key(p) if p.sla.meets else _closeness_key(p)))  # noqa: E731
    cheaper = [order(by_size[w])[0] for w in sorted(by_size) if w < best.world_size][-MAX_CHEAPER_SHOWN:]
    same = order(by_size.get(best.world_size, []))[:MAX_SAME_SIZE_SHOWN]
    bigger = [ps[0] for w in sorted(by_size) if w > best.world_size and (ps := order(by_size[w]))[0].sla.meets][:1]
    largest = max(by_size, default=0)
    fastest = [min(by_size[largest], key=lambda p: (not p.sla.meets, p.decode.estimate_ms))] \
        if largest > best.world_size else []
    return cheaper + same + bigger + [p for p in fastest if all(p is not q for q in bigger)]


def search_layouts(recipe: Recipe, spec: ModelSpec, hw: HardwareSpec) -> tuple[Plan, SearchResult]:
    """Evaluate every layout TensorRT-LLM can run on the recipe's hardware and choose one."""
    plans, rejected = [], []
    for m in candidate_mappings(hw.total_gpus, hw.gpus_per_node, spec.is_moe):
        if problems := mapping_violations(spec, m, hw.total_gpus):
            rejected.append(f"{layout_name(m, spec.is_moe)}: {problems[0]}")
        else:
            plans.append(evaluate(recipe, spec, hw, m))
    feasible = sorted((p for p in plans if p.sla.meets), key=_cost_key)
    if feasible:
        best = feasible[0]
        peers = sum(1 for p in feasible if p.world_size == best.world_size)
        why = f"fewest GPUs that meet the SLA ({best.world_size})"
        if peers > 1:
            why += f"; lowest TPOT of the {peers} layouts on {best.world_size} GPUs that meet it"
        cheaper = [p for p in plans if p.world_size < best.world_size]
        if cheaper:
            closest = min(cheaper, key=_closeness_key)
            name = layout_name(closest.mapping, spec.is_moe)
            why += f"; fewer GPUs miss it, closest {name}: {_reason(closest, best)}"
    else:
        best = min(plans, key=_closeness_key)
        why = (f"no layout on up to {hw.total_gpus} GPUs meets the SLA; closest: {_reason(best, best)}; "
               "consider more GPUs, weight quantization, a shorter context or a looser SLA")
    runners = [candidate(p, _reason(p, best)) for p in _runners_up(plans, best)]
    examples = list(dict.fromkeys(r.split(": ", 1)[1] for r in rejected))[:3]
    return best, SearchResult(considered=len(plans), rejected_by_shape=len(rejected), shape_examples=examples,
                              chosen=candidate(best, why), chosen_reason=why, runners_up=runners)
