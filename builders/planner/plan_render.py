"""Rich tables for a Plan on a terminal (`enginesmith plan RECIPE`)."""

from __future__ import annotations

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from enginesmith.builders.planner.comms import TARGET_COMMS
from enginesmith.builders.planner.hardware import GIB
from enginesmith.builders.planner.plan_types import Plan
from enginesmith.builders.planner.roofline import PhaseEstimate

MAX_RANK_ROWS = 32


def size(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes:,.0f} B"


def count(n: float) -> str:
    """Parameter counts: 13.0B, 1.03T, 0.5M."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:,.{2 if unit == 'T' else 1}f}{unit}"
    return f"{n:,.0f}"


def spans(values: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2,5-6'."""
    if not values:
        return "-"
    out, start, prev = [], values[0], values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def _header(plan: Plan) -> Panel:
    r, s, hw, m = plan.recipe, plan.spec, plan.hardware, plan.mapping
    moe = f", {s.num_experts} experts top-{s.num_experts_per_tok}" if s.is_moe else ""
    lines = [
        f"[b]{r.name}[/b]: {escape(s.name or r.model.source)} ({s.architecture}, {count(s.num_params())} params, "
        f"{count(s.num_active_params())} active{moe})",
        f"dtype {r.model.dtype}, weights {r.quantization.weights}, KV cache {r.quantization.kv_cache}; "
        f"build target {r.build.target}",
        f"hardware: {hw.nodes} x {hw.gpus_per_node} {hw.gpu} ({hw.memory_bytes / GIB:,.1f} GiB, {hw.hbm_gbps:,.0f} GB/s"
        f" HBM); intra-node {hw.intra_node.kind} {hw.intra_node.gbps:,.0f} GB/s, inter-node {hw.inter_node.kind} "
        f"{hw.inter_node.gbps:,.0f} GB/s",
        f"layout: world_size {m.world_size} = tp_size {m.tp_size} x pp_size {m.pp_size}"
        + (f"; moe_ep_size {m.moe_ep_size} x moe_tp_size {m.moe_tp_size}" if s.is_moe else ""),
    ]
    return Panel("\n".join(lines), title="plan")


def _ranks(plan: Plan) -> Table:
    t = Table(title="ranks (TP innermost)")
    moe = plan.spec.is_moe  # a dense model has no expert split to show
    for col in ("rank", "node:gpu", "tp", "pp", *(("ep", "mtp") if moe else ()), "layers",
                *(("experts",) if moe else ()), "weights", "workspace", "KV/token", "KV tokens"):
        t.add_column(col, justify="right")
    for r in plan.ranks[:MAX_RANK_ROWS]:
        mem = r.memory
        t.add_row(str(r.rank), f"{r.node}:{r.local_gpu}", str(r.tp_rank), str(r.pp_rank),
                  *((str(r.moe_ep_rank), str(r.moe_tp_rank)) if moe else ()), spans(r.layers),
                  *((spans(r.experts),) if moe else ()), size(mem.weight_bytes),
                  size(mem.workspace_bytes), size(mem.kv_bytes_per_token), f"{mem.kv_tokens:,}")
    if len(plan.ranks) > MAX_RANK_ROWS:
        t.caption = f"{len(plan.ranks) - MAX_RANK_ROWS} more ranks: same as their stage's rows (--json has all)"
    return t


def _memory(plan: Plan) -> Table:
    mm = plan.memory
    t = Table(title="memory per GPU (tightest)", show_header=False)
    t.add_column()
    t.add_column(justify="right")
    rows = [("GPU memory", size(mm.gpu_memory_bytes)), ("weights (max)", size(mm.weight_bytes_max)),
            ("activation workspace", size(mm.workspace_bytes_max)),
            ("KV bytes / token (max)", size(mm.kv_bytes_per_token_max)),
            ("KV tokens that fit", f"{mm.kv_tokens:,}"),
            (f"sequences of max_seq_len {plan.recipe.build.max_seq_len}", f"{mm.kv_sequences:,}"),
            (f"sequences of isl+osl {plan.recipe.sla.isl + plan.recipe.sla.osl}"
             + (f", {plan.prefill.cached_tokens:,} shared" if plan.prefill.cached_tokens else ""),
             f"{mm.sla_sequences:,}"),
            ("all weights over all GPUs", size(mm.model_weight_bytes))]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _phases(plan: Plan) -> Table:
    t = Table(title=f"roofline per step (decode batch {plan.batch}, concurrency {plan.concurrency})")
    for col in ("phase", "tokens", "micro-batches", "compute floor", "HBM floor", "floor", "comm", "estimate",
                "fixed", "bound by"):
        t.add_column(col, justify="right")
    for ph in (plan.prefill, plan.decode, plan.prefill_burst):
        tokens = f"{ph.tokens:,}" + (f" (+{ph.cached_tokens:,} cached/seq)" if ph.cached_tokens else "")
        t.add_row(ph.phase, tokens, str(ph.micro_batches), f"{ph.compute_ms:,.2f} ms",
                  f"{ph.hbm_ms:,.2f} ms", f"{ph.floor_ms:,.2f} ms", f"{ph.comm_ms:,.2f} ms",
                  f"{ph.estimate_ms:,.2f} ms", f"{ph.fixed_ms:,.2f} ms", ph.bound_by)
    p = plan.pipeline
    if p.pp_size > 1:
        t.caption = (f"PP bubble {p.bubble_fraction:.1%} with {p.micro_batches} micro-batches "
                     f"(prefill burst); decode keeps {p.decode_micro_batches} batches in flight")
    return t


def _comms(phases: list[PhaseEstimate]) -> Table:
    target = phases[0].target
    t = Table(title=f"communication per step, as build target {target} runs it",
              caption=TARGET_COMMS.get(target, ""))
    for col in ("phase", "kind", "link", "group", "ops", "bytes/op", "bytes/GPU", "time"):
        t.add_column(col, justify="right")
    for ph in phases:
        for c in ph.comm:
            t.add_row(ph.phase, c.kind, c.link, str(c.group_size), str(c.count), size(c.bytes_per_op),
                      size(c.bytes_per_gpu), f"{c.time_s * 1e3:,.3f} ms")
    return t


def _sla(plan: Plan) -> Table:
    v = plan.sla
    colour = "green" if v.meets else "red"
    t = Table(title="SLA", caption=f"[{colour}]{v.summary}[/{colour}] | binding: [b]{v.binding}[/b]")
    for col in ("check", "estimate", "target", "ok", "bound by"):
        t.add_column(col, justify="right")
    for c in v.checks:
        digits = 1 if c.unit in ("ms", "GiB") else 0
        t.add_row(c.name, f"{c.estimate:,.{digits}f} {c.unit}", f"{c.target:,.{digits}f} {c.unit}",
                  "yes" if c.ok else "[red]NO", c.bound_by)
    return t


def _search(plan: Plan) -> Table | None:
    s = plan.search
    if s is None:
        return None
    rejected = (f"; {s.rejected_by_shape} rejected by shape rules (e.g. {'; '.join(s.shape_examples)})"
                if s.rejected_by_shape else "")
    t = Table(title=f"parallel: auto chose {s.chosen.layout} on {s.chosen.gpus} GPUs",
              caption=f"{s.chosen_reason}. Scored {s.considered} layouts{rejected}")
    for col in ("runner-up", "GPUs", "meets", "TPOT", "TTFT", "why not"):
        t.add_column(col, justify="right" if col in ("GPUs", "TPOT", "TTFT") else "left")
    for c in s.runners_up:
        t.add_row(c.layout, str(c.gpus), "yes" if c.meets else "no", f"{c.tpot_ms:,.1f} ms", f"{c.ttft_ms:,.0f} ms",
                  c.reason)
    return t


def _quant(plan: Plan) -> Table | None:
    if not plan.quantization_options:
        return None
    t = Table(title=f"weight quantization on {plan.hardware.gpu}")
    for col in ("weights", "runs here", "layout", "GPUs", "weights/GPU", "fits", "meets SLA", "TPOT", "why"):
        t.add_column(col)
    for q in plan.quantization_options:
        if not q.runnable:
            t.add_row(q.weights, "[red]no", "-", "-", "-", "-", "-", "-", q.reason)
            continue
        t.add_row(q.weights, "yes", q.layout, str(q.gpus), f"{q.weight_gib_per_gpu:,.1f} GiB",
                  "yes" if q.fits else "no", "yes" if q.meets else "no", f"{q.tpot_ms:,.1f} ms", q.reason)
    return t


def render(plan: Plan, console: Console | None = None) -> None:
    """Print every table of the plan."""
    console = console or Console()
    parts = [_header(plan), _ranks(plan), _memory(plan), _phases(plan), _comms([plan.prefill, plan.decode]),
             _sla(plan), _search(plan), _quant(plan)]
    console.print(Group(*(p for p in parts if p is not None)))
    for note in plan.notes:
        console.print(f"note: {note}", markup=False)
    for warning in plan.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False)
