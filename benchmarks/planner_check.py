"""The planner's predictions next to what benchmarks/runtime.py measured on a GPU (issue 6).

Reads the runtime JSON files in benchmarks/results/ (card named in each), plans the same shapes with
`builders.plan.make_plan` on that card's catalogue entry, and prints one table: weight memory per GPU,
batch-1 decode step, batch-32 decode step, TP=2 decode step and the PP bubble, each predicted vs
measured with the error. Writes benchmarks/results/planner-vs-measured.json.
Usage: python -m benchmarks.planner_check [--results DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from builders.model_spec import ModelSpec
from builders.plan import make_plan
from builders.recipe import parse_recipe

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"memory": 0.10, "step": 0.25}
PP_SEQS = 16
"""runtime_parallel.py's pp section: 16 sequences of tokens_per_step / 16 tokens each."""
MOE_SHAPE = {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
             "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6}
"""runtime.random_model.MIXTRAL_8X7B trimmed to 8 layers, as benchmarks/runtime.py's moe section runs it."""


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


def _row(what: str, predicted: float, measured: float, unit: str, kind: str, source: str) -> dict:
    err = (predicted - measured) / measured if measured else float("nan")
    return dict(what=what, predicted=predicted, measured=measured, unit=unit, error=err,
                within_target=abs(err) <= TARGETS[kind], target=TARGETS[kind], source=source)


def compare(results_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(results_dir.glob("runtime-*.json")):
        data = json.loads(path.read_text())
        if data.get("tiny") or not str(data.get("device", "")).startswith("cuda"):
            continue
        gpu = "H200" if "H200" in data["card"] else "H100"
        src = f"{path.name} ({data['card']})"
        if "decode" in data:
            d = data["decode"]
            # decode steps from prompt_len for fast.tokens tokens: mean context prompt_len + tokens / 2
            plan = make_plan(_recipe(gpu, 1, 1, 1, isl=d["prompt_len"], osl=d["fast"]["tokens"]))
            mem = d.get("gpu_memory", {}).get("model_allocated_bytes") or d["weight_bytes_per_token"]
            rows.append(_row("weights per GPU, Llama-3-8B bf16", plan.memory.weight_bytes_max / 2**30,
                             mem / 2**30, "GiB", "memory", src))
            rows.append(_row("decode step, batch 1", plan.decode.estimate_ms, d["fast"]["ms_per_token"], "ms",
                             "step", src))
        if "moe" in data:
            d = data["moe"]
            spec = ModelSpec.from_hf_config(MOE_SHAPE, name="mixtral-8x7b-8-layers")
            plan = make_plan(_recipe(gpu, 1, 1, 1, isl=d["prompt_len"], osl=d["fast"]["tokens"]), spec=spec,
                             with_options=False)
            rows.append(_row("decode step, Mixtral-8x7B 8 layers, batch 1", plan.decode.estimate_ms,
                             d["fast"]["ms_per_token"], "ms", "step", src))
        for tp_key, tp in (("tp1", 1), ("tp2", 2)):
            for batch in ("1", "32"):
                m = data.get("tp", {}).get(tp_key, {}).get(batch)
                if m:
                    # runtime_parallel.py: greedy steps from context 512 to 640, so isl 512 + osl 128 / 2
                    plan = make_plan(_recipe(gpu, tp, 1, int(batch)))
                    rows.append(_row(f"decode step, tp={tp}, batch {batch}", plan.decode.estimate_ms,
                                     m["ms_per_step"], "ms", "step", src))
        pp = data.get("pp")
        if pp:
            rows += _pp_rows(gpu, pp, src)
    return rows


def _pp_rows(gpu: str, pp: dict, src: str) -> list[dict]:
    """runtime_parallel.py's pp section: a burst of seqs x seq_len prompt tokens through pp=2, m micro-batches."""
    seqs, seq_len = PP_SEQS, pp["tokens_per_step"] // PP_SEQS
    rows = []
    for m, measured in pp["measured_bubble"].items():
        plan = make_plan(_recipe(gpu, 1, 2, seqs, isl=seq_len, micro=int(m)), with_options=False)
        if m == "1":
            stage_ms = plan.prefill_burst.estimate_ms / 2  # two equal stages, one micro-batch (+ one p2p)
            rows.append(_row(f"PP=2 stage, {seqs}x{seq_len} prefill", stage_ms, 1e3 * max(pp["stage_s"]), "ms",
                             "step", src))
        rows.append(_row(f"PP=2 bubble, {m} micro-batches", plan.pipeline.bubble_fraction, measured, "fraction",
                         "step", src))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    rows = compare(ap.parse_args().results)
    print(f"{'quantity':<40} {'predicted':>10} {'measured':>10} {'unit':>8} {'error':>8}  ok")
    for r in rows:
        print(f"{r['what']:<40} {r['predicted']:>10.3f} {r['measured']:>10.3f} {r['unit']:>8} "
              f"{100 * r['error']:>7.1f}%  {'yes' if r['within_target'] else 'NO'}")
    (RESULTS / "planner-vs-measured.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
