"""The planner's predictions next to what benchmarks/runtime.py measured on a GPU (issue 6).

Reads the runtime JSON files in benchmarks/results/ (card named in each), plans the same shapes with
`builders.planner.plan.make_plan` on that card's catalogue entry, and prints one table: weight memory per GPU,
batch-1 decode step (the runtime's fast path and its labelled baselines, e.g. cuBLAS + compiled regions),
batch-32 and TP=2 decode steps, the 8 KB all-reduce inside a CUDA graph and the PP bubble, each predicted
vs measured with the error. The rows measured by CALIBRATION and MULTI_TOKEN_CALIBRATION are the ones
builders.planner.perf_constants was fitted on (role "calibration"); every other row is an independent check.
Prints the table; `--write` also writes <results>/planner-vs-measured.json (the tracked copy).
Usage: python -m benchmarks.planner_check [--results DIR] [--write]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from enginesmith.builders.planner.hardware import resolve_hardware
from enginesmith.builders.manifest import atomic_write_text
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.planner.plan import make_plan
from enginesmith.builders.recipe import parse_recipe

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"memory": 0.10, "step": 0.25}
CALIBRATION = ("runtime-h200-decode-gemv.json", "decode")
"""(file, section) whose fast-path batch-1 step HBM_EFFICIENCY and LAYER_FIXED_US were fitted on."""
MULTI_TOKEN_CALIBRATION = ("runtime-h200-x2-tp-rows.json", "tp1", "32_cublas_regions")
"""(file, tp key, result key) of the batch-32 step MULTI_TOKEN_LAYER_FIXED_US was fitted on."""
PP_SEQS = 16
"""runtime_parallel.py's pp section: 16 sequences of tokens_per_step / 16 tokens each."""
MOE_SHAPE = {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
             "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6}
"""enginesmith.runtime.model.random_model.MIXTRAL_8X7B trimmed to 8 layers, as benchmarks/runtime.py's moe section
runs it."""
BASELINE_LABELS = {"cublas_regions": "cuBLAS + compiled regions", "no_pdl": "fused GEMV, no PDL",
                   "previous": "fused GEMV, no PDL", "no_exchange": "fused GEMV + PDL, one-shot all-reduce",
                   "exchange": "fused GEMV + PDL, TP exchange", "rows": "fused rows kernels + PDL (opt-in)",
                   "grouped_mm": "experts on torch's grouped GEMM",
                   "collectives": "fused GEMV + PDL, one-shot all-reduce"}
"""Names of the runtime's baseline paths (decode.baselines.<key>, tp.<tpN>.<batch>_<key>) as the table shows them
("previous" / "no_exchange": the keys of the runs made while the fused TP exchange was the default;
"collectives": since the exchange kernels are)."""
FILE_LABELS = {"runtime-h200-x2-tp-kernel.json": {"exchange": "fused GEMV + PDL, TP exchange kernels"},
               "runtime-h200-x2-tp-kernel-rerun.json": {"exchange": "fused GEMV + PDL, TP exchange kernels"},
               "runtime-h200-x2-tp-split.json": {"exchange": "fused GEMV + PDL, TP exchange split"}}
"""Baseline names particular to one run: there `1_exchange` ran ENGINESMITH_TP_EXCHANGE=kernel / split."""
SUPERSEDED = ("-exchange-v1.json", "-exchange-v2.json", "-exchange-v3.json", "runtime-h200-x2-tp-mixtral.json")
"""Runs the table skips: the TP exchange's earlier versions (their default-path rows repeat the last run's;
README quotes all four runs) and the first Mixtral tp run, whose batch-32 steps (experts on torch's grouped GEMM,
36-41% over the plan) were corrected by runtime/kernels/triton_moe_rows.py:
runtime-h200-x2-tp-mixtral-rows.json times both
paths."""
SUPERSEDED_BASELINES = {"runtime-h200-x2-tp-device-fed.json": ("1_exchange",),
                        "runtime-h200-x2-tp70b-device-fed.json": ("1_exchange",)}
"""Baseline rows timed with a version of their path since replaced (the TP exchange v5's first form, polling
element by element in every K tile: 5x slower; runtime/parallel/tp_signal.py): the table skips them."""
TP70B_SHAPE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 8192,
               "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 28672,
               "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}
"""enginesmith.runtime.model.random_model.LLAMA_3_70B (the tp section's --tp-shape llama-3-70b), layers from the run."""


def _recipe(gpu: str, tp: int, pp: int, concurrency: int, isl: int = 512, osl: int = 128,
            micro: int | None = None):
    return parse_recipe({
        "name": f"llama3-8b-{gpu.lower()}-tp{tp}-pp{pp}",
        "model": {"source": "meta-llama/Llama-3.1-8B", "dtype": "bfloat16", "spec": "llama-3.1-8b"},
        "hardware": {"gpu": gpu, "gpus_per_node": max(tp * pp, 1), "nodes": 1},
        "parallel": {"tp_size": tp, "pp_size": pp, "pp_micro_batches": micro},
        "build": {"target": "reference", "max_batch_size": 64, "max_input_len": 2048, "max_seq_len": 4096},
        "sla": {"ttft_ms": 10000, "tpot_ms": 1000, "concurrency": concurrency, "isl": isl, "osl": osl},
    })


def _row(what: str, predicted: float, measured: float, unit: str, kind: str, source: str,
         role: str = "check") -> dict:
    err = (predicted - measured) / measured if measured else float("nan")
    return dict(what=what, predicted=predicted, measured=measured, unit=unit, error=err,
                within_target=abs(err) <= TARGETS[kind], target=TARGETS[kind], role=role, source=source)


def _kernels(status: dict | None, batch: int = 1) -> str:
    """How the runtime ran the step, from its status block: which GEMVs (batches > 1: the rows kernels where the
    status names them, else cuBLAS; MoE experts through runtime/kernels/triton_moe_rows.py), with PDL, with the TP
    exchange."""
    gemv = str((status or {}).get("gemv", ""))
    if batch > 1:
        experts = ", Triton grouped experts" if "grouped rows kernels" in str((status or {}).get("moe", "")) else ""
        if "through the rows kernels" in gemv:
            return ("fused rows kernels + PDL" if "PDL on" in gemv else "fused rows kernels") + experts
        return ("cuBLAS + compiled regions" if gemv.startswith("fused") else "cuBLAS") + experts
    if not gemv.startswith("fused"):
        return "cuBLAS"
    for mode in ("kernel", "split"):
        if f"exchange kernels ({mode})" in gemv:
            return BASELINE_LABELS["exchange"] + (" kernels" if mode == "kernel" else " split")
    if "(TP exchange)" in gemv:
        return BASELINE_LABELS["exchange"]
    return "fused GEMV + PDL" if "PDL on" in gemv else "fused GEMV kernels"


def _decode_rows(gpu: str, d: dict, src: str, calibration: bool) -> list[dict]:
    # decode steps from prompt_len for fast.tokens tokens: mean context prompt_len + tokens / 2
    plan = make_plan(_recipe(gpu, 1, 1, 1, isl=d["prompt_len"], osl=d["fast"]["tokens"]))
    mem = d.get("gpu_memory", {}).get("model_allocated_bytes") or d["weight_bytes_per_token"]
    rows = [_row("weights per GPU, Llama-3-8B bf16", plan.memory.weight_bytes_max / 2**30, mem / 2**30, "GiB",
                 "memory", src),
            _row(f"decode step, batch 1, {_kernels(d['fast'].get('status'))}", plan.decode.estimate_ms,
                 d["fast"]["ms_per_token"], "ms", "step", src, "calibration" if calibration else "check")]
    if fed := d["fast"].get("device_fed"):
        rows.append(_row(f"decode step, batch 1, {_kernels(d['fast'].get('status'))}, token fed on the GPU",
                         plan.decode.estimate_ms, fed["ms_per_token"], "ms", "step", src))
    for key, base in d.get("baselines", {}).items():
        rows.append(_row(f"decode step, batch 1, {BASELINE_LABELS.get(key, key)}", plan.decode.estimate_ms,
                         base["ms_per_token"], "ms", "step", src))
    return rows


def _tp_rows(gpu: str, tp_data: dict, src: str) -> list[dict]:
    """runtime_parallel.py's tp section: greedy steps from context 512 to 640, so isl 512 + osl 128 / 2."""
    rows, model = [], tp_data.get("model") or {"shape": "llama-3-8b"}
    file = src.split(" ")[0]
    spec, name = None, "Llama-3-8B"
    if model["shape"] == "llama-3-70b":
        spec = ModelSpec.from_hf_config(TP70B_SHAPE | {"num_hidden_layers": model["layers"]},
                                        name=f"llama-3-70b-{model['layers']}-layers")
        name = f"Llama-3-70B shape, {model['layers']} layers"
    elif model["shape"] == "mixtral-8x7b":
        spec = ModelSpec.from_hf_config(MOE_SHAPE | {"num_hidden_layers": model["layers"]},
                                        name=f"mixtral-8x7b-{model['layers']}-layers")
        name = f"Mixtral-8x7B, {model['layers']} layers"
    for tp_key, tp in (("tp1", 1), ("tp2", 2)):
        runs = tp_data.get(tp_key, {})
        for batch in ("1", "32"):
            m = runs.get(batch)
            if not m:
                continue
            plan = make_plan(_recipe(gpu, tp, 1, int(batch)), spec=spec, with_options=False)
            what = f"decode step, {name}, tp={tp}, batch {batch}" if spec else f"decode step, tp={tp}, batch {batch}"
            fed = ", token fed on the GPU" if "ms_per_step_host_sync" in m else ""  # runs since session 7
            rows.append(_row(f"{what}, {_kernels(m.get('status'), int(batch))}{fed}", plan.decode.estimate_ms,
                             m["ms_per_step"], "ms", "step", src))
            for key, label in (BASELINE_LABELS | FILE_LABELS.get(file, {})).items():
                if f"{batch}_{key}" in SUPERSEDED_BASELINES.get(file, ()):
                    continue
                if base := runs.get(f"{batch}_{key}"):
                    calib = (file, tp_key, f"{batch}_{key}") == MULTI_TOKEN_CALIBRATION
                    rows.append(_row(f"{what}, {label}{fed}", plan.decode.estimate_ms, base["ms_per_step"], "ms",
                                     "step", src, "calibration" if calib else "check"))
        if micro := runs.get("allreduce_micro"):
            link = resolve_hardware(_recipe(gpu, tp, 1, 1).hardware).intra_node
            predicted = 1e6 * link.ring_allreduce_s(micro["bytes"], tp)
            for key, label in (("fast_us", "one-shot (symmetric memory)"), ("nccl_us", "NCCL")):
                rows.append(_row(f"all-reduce {micro['bytes'] // 1024} KB in a CUDA graph, tp={tp}, {label}",
                                 predicted, micro[key], "us", "step", src))
    return rows


def compare(results_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(results_dir.glob("runtime-*.json")):
        if path.name.endswith(SUPERSEDED):
            continue
        data = json.loads(path.read_text())
        if data.get("tiny") or not str(data.get("device", "")).startswith("cuda"):
            continue
        gpu = "H200" if "H200" in data["card"] else "H100"
        src = f"{path.name} ({data['card']})"
        if "decode" in data:
            rows += _decode_rows(gpu, data["decode"], src, (path.name, "decode") == CALIBRATION)
        if "moe" in data:
            d = data["moe"]
            spec = ModelSpec.from_hf_config(MOE_SHAPE, name="mixtral-8x7b-8-layers")
            plan = make_plan(_recipe(gpu, 1, 1, 1, isl=d["prompt_len"], osl=d["fast"]["tokens"]), spec=spec,
                             with_options=False)
            rows.append(_row(f"decode step, Mixtral-8x7B 8 layers, batch 1, {_kernels(d['fast'].get('status'))}",
                             plan.decode.estimate_ms, d["fast"]["ms_per_token"], "ms", "step", src))
            for key, base in d.get("baselines", {}).items():
                rows.append(_row(f"decode step, Mixtral-8x7B 8 layers, batch 1, {BASELINE_LABELS.get(key, key)}",
                                 plan.decode.estimate_ms, base["ms_per_token"], "ms", "step", src))
        if "tp" in data:
            rows += _tp_rows(gpu, data["tp"], src)
        if (pp := data.get("pp")) and "layers" in pp:  # earlier pp runs (float32 math attention): README history
            rows += _pp_rows(gpu, pp, src)
    return rows


def _pp_rows(gpu: str, pp: dict, src: str) -> list[dict]:
    """runtime_parallel.py's pp section: a burst of seqs x seq_len prompt tokens through pp=2, m micro-batches;
    the layers it ran (graphed, compiled or eager prefill layers) and the baselines timed beside them."""
    from benchmarks.runtime_parallel import pp_runs  # imports torch: only where pp results are read

    seqs, seq_len = PP_SEQS, pp["tokens_per_step"] // PP_SEQS
    rows = []
    for name, run in pp_runs(pp).items():
        for m, measured in run["measured_bubble"].items():
            plan = make_plan(_recipe(gpu, 1, 2, seqs, isl=seq_len, micro=int(m)), with_options=False)
            if m == "1":
                stage_ms = plan.prefill_burst.estimate_ms / 2  # two equal stages, one micro-batch (+ one p2p)
                rows.append(_row(f"PP=2 stage, {seqs}x{seq_len} prefill, {name} layers", stage_ms,
                                 1e3 * max(run["stage_s"]), "ms", "step", src))
            rows.append(_row(f"PP=2 bubble, {m} micro-batches, {name} layers", plan.pipeline.bubble_fraction,
                             measured, "fraction", "step", src))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--write", action="store_true", help="Also write <results>/planner-vs-measured.json.")
    args = ap.parse_args()
    results = args.results
    rows = compare(results)
    print(f"{'quantity':<64} {'predicted':>10} {'measured':>10} {'unit':>8} {'error':>8}  ok   {'role':<11} source")
    for r in rows:
        print(f"{r['what']:<64} {r['predicted']:>10.3f} {r['measured']:>10.3f} {r['unit']:>8} "
              f"{100 * r['error']:>+7.1f}%  {'yes' if r['within_target'] else 'NO ':<4} {r['role']:<11} "
              f"{r['source'].split(' ')[0]}")
    if args.write:
        atomic_write_text(results / "planner-vs-measured.json", json.dumps(rows, indent=2) + "\n")
        print(f"wrote {results / 'planner-vs-measured.json'}")


if __name__ == "__main__":
    main()
