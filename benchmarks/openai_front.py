"""The OpenAI front's overhead over the ensemble, measured side by side on the tiny CPU model.

Serves the tiny random llama (reference runtime) with the generated repository, starts `enginesmith openai`
twice (over tensorrt_llm: token ids, the front tokenizes; over the ensemble: text, Triton's pre/postprocessing
models tokenize), and runs `client.bench` against four paths with the same prompts (exact ISL, exactly OSL
output tokens, greedy): the ensemble over gRPC (the Triton text path), the front over tensorrt_llm, the front
over the ensemble, and tensorrt_llm itself with token ids (the floor: no tokenizer anywhere). The paths take
turns, round after round, so a slower stretch of a shared machine hits them all; each figure is the median over
rounds. Each run also records the CPU time every serving process spent (tritonserver, each Python-backend
model's stub, each front) per output token: what a path costs, which contention on a shared machine does not
blur the way it blurs latency. Targets: the front over tensorrt_llm within 5% of the ensemble's output
throughput and within 1 ms of its p50 TTFT. Writes <results>/openai-front-cpu.json and .png.
Usage: python -m benchmarks.openai_front [--rounds 3] [--num-prompts 48] [--concurrency 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from enginesmith.builders.manifest import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"throughput_loss": 0.05, "ttft_p50_ms": 1.0}
PATHS = ("ensemble", "openai->tensorrt_llm", "openai->ensemble", "tensorrt_llm")
KEYS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms",
        "median_e2el_ms", "client_cpu_s_per_request")
MEDIANS = (*KEYS, "server_cpu_us_per_token")


def serve_tiny(root: Path, max_batch: int):
    """The tiny llama built for the reference runtime and served; (server, recipe file, tokenizer dir)."""
    from enginesmith.builders.build.reference import build_reference
    from enginesmith.builders.convert import convert_checkpoint
    from enginesmith.builders.model_spec import ModelSpec
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import parse_recipe
    from enginesmith.builders.tiny_model import make_tiny_model
    from enginesmith.triton_repo.repository import write_repo
    from enginesmith.triton_repo.server import TritonServer

    hf = make_tiny_model(root / "hf", "llama")
    data = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-llama.yaml").read_text())
    data["model"]["source"] = str(hf)
    data["build"]["max_batch_size"] = data["serve"]["triton_max_batch_size"] = max_batch
    recipe = parse_recipe(data)
    plan = make_plan(recipe, with_options=False)
    ckpt = root / "checkpoint"
    convert_checkpoint(hf, ckpt, plan.mapping, ModelSpec.from_pretrained_dir(hf), "float32", "none", workers=1)
    build_reference(recipe, plan, ckpt, root / "engine")
    write_repo(recipe, plan, root / "engine", ckpt / "tokenizer", root / "repo")
    server = TritonServer(root / "repo", log_path=root / "server.log").start()
    data["serve"]["grpc_port"] = server.endpoints.grpc_port
    recipe_path = root / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    return server, recipe_path, ckpt / "tokenizer"


def serving_processes(server, fronts: dict) -> dict[str, psutil.Process]:
    """tritonserver, its model stubs (named by model) and the fronts (named by path)."""
    main = psutil.Process(server.proc.pid)
    procs = {"tritonserver": main}
    for child in main.children(recursive=True):
        cmd = " ".join(child.cmdline())
        for model in ("preprocessing", "postprocessing", "tensorrt_llm_bls", "tensorrt_llm"):
            if f"/{model}/" in cmd:
                procs.setdefault(model, child)
                break
    for path, front in fronts.items():
        procs[path] = psutil.Process(front.proc.pid)
    return procs


def cpu_s(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}


def bench_one(path: str, server, fronts: dict, prompts, point, num_prompts: int, tok, procs) -> dict:
    from enginesmith.client.bench import BenchConfig, run_bench

    common = dict(points=[point], num_prompts=num_prompts, warmup=2, metrics_url=None, server_timings=False)
    if path.startswith("openai->"):
        cfg = BenchConfig(server.grpc_url, "", backend="openai", openai_url=fronts[path].url, **common)
    else:
        cfg = BenchConfig(server.grpc_url, path, **common)
    before = cpu_s(procs)
    (run,) = asyncio.run(run_bench(cfg, prompts, tokenizer=tok, show_progress=False))
    used = {k: v - before[k] for k, v in cpu_s(procs).items()}
    if run["completed"] != num_prompts or run["total_output_tokens"] != num_prompts * prompts[0].output_len:
        raise RuntimeError(f"{path} {point.label}: {run['completed']}/{num_prompts} requests, "
                           f"{run['total_output_tokens']} output tokens: not the exact lengths asked for")
    tokens = (num_prompts + cfg.warmup) * prompts[0].output_len
    cpu_us = {k: 1e6 * v / tokens for k, v in used.items() if v > 0}
    return {**{k: run[k] for k in KEYS}, "server_cpu_us_per_token": sum(cpu_us.values()), "cpu_us_per_token": cpu_us}


def summarize(rows: list[dict], labels: list[str]) -> dict:
    """Median over rounds per path and load point, and the front's overheads against the ensemble."""
    out: dict = {}
    for label in labels:
        med = {p: {k: statistics.median(r[k] for r in rows if r["path"] == p and r["label"] == label)
                   for k in MEDIANS} for p in PATHS}
        base = med["ensemble"]
        over = {p: {"throughput_change": med[p]["output_throughput"] / base["output_throughput"] - 1,
                    "ttft_p50_delta_ms": med[p]["median_ttft_ms"] - base["median_ttft_ms"],
                    "tpot_p50_delta_ms": med[p]["median_tpot_ms"] - base["median_tpot_ms"]}
                for p in PATHS if p != "ensemble"}
        front = over["openai->tensorrt_llm"]
        out[label] = {"median": med, "vs_ensemble": over,
                      "targets_met": front["throughput_change"] >= -TARGETS["throughput_loss"]
                      and front["ttft_p50_delta_ms"] <= TARGETS["ttft_p50_ms"]}
    return out


def plot(summary: dict, path: Path) -> None:
    from enginesmith.client.plots import _pyplot, _save

    plt = _pyplot()
    labels = list(summary)
    panels = (("output_throughput", "output tokens/s (median over rounds)"), ("median_ttft_ms", "p50 TTFT ms"),
              ("server_cpu_us_per_token", "serving CPU us per output token"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    width = 0.8 / len(PATHS)
    for i, p in enumerate(PATHS):
        xs = [j + i * width for j in range(len(labels))]
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.bar(xs, [summary[lb]["median"][p][key] for lb in labels], width, label=p)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("OpenAI front vs ensemble, tiny llama on CPU (reference runtime)")
    fig.tight_layout()
    _save(fig, path)


def main() -> None:
    from enginesmith.client.bench import LoadPoint
    from enginesmith.client.dataset import random_prompts
    from enginesmith.client.tokenizer import load_tokenizer
    from enginesmith.triton_repo.openai_api.runner import FrontProcess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--isl", type=int, default=64)
    ap.add_argument("--osl", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    points = [LoadPoint("concurrency", int(c)) for c in args.concurrency.split(",")]
    root = Path(tempfile.mkdtemp(prefix="enginesmith-openai-front-"))
    server, recipe, tok_dir = serve_tiny(root, args.max_batch)
    fronts = {}
    try:
        tok = load_tokenizer(tok_dir)
        prompts = random_prompts(tok, args.num_prompts + 2, args.isl, args.osl, seed=0)
        for path, model in (("openai->tensorrt_llm", "tensorrt_llm"), ("openai->ensemble", "ensemble")):
            fronts[path] = FrontProcess(recipe, out=root / "out", triton_model=model,
                                        log_path=root / f"front-{model}.log").start()
        procs = serving_processes(server, fronts)
        rows = []
        for rnd in range(args.rounds):
            order = PATHS[rnd % len(PATHS):] + PATHS[: rnd % len(PATHS)]
            for point in points:
                for path in order:
                    t0 = time.monotonic()
                    row = bench_one(path, server, fronts, prompts, point, args.num_prompts, tok, procs)
                    rows.append({"round": rnd, "path": path, "label": point.label, **row})
                    print(f"round {rnd} {point.label} {path:22s} {row['output_throughput']:7.1f} tok/s  "
                          f"TTFT p50 {row['median_ttft_ms']:6.2f} ms  TPOT p50 {row['median_tpot_ms']:5.2f} ms  "
                          f"server CPU {row['server_cpu_us_per_token']:5.0f} us/token  "
                          f"({time.monotonic() - t0:.1f} s)", file=sys.stderr)
    finally:
        for f in fronts.values():
            f.stop()
        server.stop()
    labels = [p.label for p in points]
    summary = summarize(rows, labels)
    result = {
        "what": "tiny llama (reference runtime, CPU) behind Triton: the ensemble over gRPC vs the OpenAI front "
                "(streamed /v1/completions) over tensorrt_llm and over the ensemble, and tensorrt_llm with token "
                "ids; closed-loop bench, greedy, exact ISL/OSL",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "setup": {"rounds": args.rounds, "num_prompts": args.num_prompts, "isl": args.isl, "osl": args.osl,
                  "max_batch_size": args.max_batch, "points": labels},
        "targets": {"throughput_loss_max": TARGETS["throughput_loss"], "ttft_p50_delta_ms_max": TARGETS["ttft_p50_ms"]},
        "summary": summary, "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "openai-front-cpu.json", json.dumps(result, indent=1))
    plot(summary, args.results / "openai-front-cpu.png")
    for label, s in summary.items():
        for p in PATHS:
            print(f"{label} {p:22s} serving CPU {s['median'][p]['server_cpu_us_per_token']:6.0f} us per output token")
        for p, o in s["vs_ensemble"].items():
            print(f"{label} {p:22s} throughput {100 * o['throughput_change']:+6.1f}%  TTFT p50 "
                  f"{o['ttft_p50_delta_ms']:+6.2f} ms  TPOT p50 {o['tpot_p50_delta_ms']:+6.2f} ms vs the ensemble")
        print(f"{label}: targets {'met' if s['targets_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
