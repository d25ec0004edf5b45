"""The served path of benchmarks/prefix_reuse.py: the recipe's repository with reuse off, then on, under the bench.

Needs the recipe's engine and tokenizer (`enginesmith build RECIPE`); the two repositories are written into
<out>/<recipe>/prefix-reuse/ and served one after the other on free ports (each server holds the whole KV
cache its fraction allows, so they never run side by side). The bench client sends the tensorrt_llm model
token ids; TTFT is what the client sees (send -> first streamed token), the hit rate comes from /metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from benchmarks.prefix_reuse import _progress, compare


def run_served(a) -> tuple[dict, str]:
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe
    from enginesmith.client.dataset import random_prompts
    from enginesmith.client.target import recipe_tokenizer
    from enginesmith.client.tokenizer import load_tokenizer

    recipe = load_recipe(a.served)
    root = Path(a.out) / recipe.name
    engine_dir, tokenizer_dir = root / "engine", recipe_tokenizer(recipe, Path(a.out))
    if not (engine_dir / "manifest.json").is_file() or tokenizer_dir is None:
        raise SystemExit(f"{root}: no built engine and tokenizer; run `enginesmith build {a.served} --out {a.out}`")
    isl, osl, n = a.system + a.unique, a.osl or 32, a.requests or 32
    b = recipe.build
    if isl > b.max_input_len or isl + osl > b.max_seq_len:
        raise SystemExit(f"--system {a.system} + --unique {a.unique} (+ --osl {osl}) exceed the engine's "
                         f"max_input_len={b.max_input_len} / max_seq_len={b.max_seq_len}: lower them")
    plan = make_plan(recipe, with_options=False)
    tok = load_tokenizer(tokenizer_dir)
    _progress(f"{recipe.name}: building prompts ({n} x {isl} tokens)")
    shared = random_prompts(tok, n * a.repeats, isl, osl, a.seed, shared_prefix=a.system)
    unique = random_prompts(tok, n * a.repeats, isl, osl, a.seed + 1)
    warm = random_prompts(tok, 2, isl, osl, a.seed + 2, shared_prefix=a.system)  # another system prompt
    runs = {}
    for label in ("off", "on"):
        variant = recipe.model_copy(update={"serve": recipe.serve.model_copy(
            update={"enable_kv_cache_reuse": label == "on"})})
        runs[label] = _serve_and_bench(a, variant, plan, engine_dir, tokenizer_dir, root / "prefix-reuse" / label,
                                       tok, warm, shared, unique, n)
    card = recipe.hardware.gpu if recipe.build.target != "reference" else _reference_card()
    results = dict(mode="served", card=card, recipe=str(a.served), model=dict(source=recipe.model.source),
                   workload=dict(system_tokens=a.system, unique_tokens=a.unique, osl=osl, requests=n,
                                 concurrency=a.concurrency, tokens_per_block=b.tokens_per_block, repeats=a.repeats),
                   **compare(runs))
    return results, card


def _reference_card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _serve_and_bench(a, recipe, plan, engine_dir: Path, tokenizer_dir: Path, folder: Path, tok, warm, shared,
                     unique, n: int) -> dict:
    from enginesmith.client.bench import BenchConfig, LoadPoint, run_bench
    from enginesmith.triton_repo.repository import write_repo
    from enginesmith.triton_repo.server import TritonServer

    label = "on" if recipe.serve.enable_kv_cache_reuse else "off"
    write_repo(recipe, plan, engine_dir, tokenizer_dir, folder / "repo")
    out = dict(shared=[], unique=[], outputs={})
    _progress(f"reuse {label}: starting tritonserver on {folder / 'repo'}")
    with TritonServer(folder / "repo", log_path=folder / "server.log", ready_timeout_s=600) as server:
        cfg = BenchConfig(server.grpc_url, "tensorrt_llm", server.metrics_url, num_prompts=n, warmup=0,
                          tokens_per_block=recipe.build.tokens_per_block)
        asyncio.run(run_bench(dataclasses.replace(cfg, points=[LoadPoint("concurrency", 1)], num_prompts=len(warm)),
                              warm, tok, show_progress=False))
        for rep in range(a.repeats):
            _progress(f"reuse {label}: repeat {rep + 1}/{a.repeats}")
            for name, prompts, point in (("shared", shared, LoadPoint("concurrency", a.concurrency)),
                                         ("unique", unique, LoadPoint("rate", float("inf")))):
                batch = prompts[rep * n: (rep + 1) * n]
                (run,) = asyncio.run(run_bench(dataclasses.replace(cfg, points=[point]), batch, tok,
                                               show_progress=False))
                if run["failed"]:
                    raise RuntimeError(f"reuse {label}, {name}: {run['failed']} requests failed, e.g. "
                                       f"{next(e for e in run['errors'] if e)}")
                out[name].append(dict(ttft_ms=[1e3 * t for t in run["ttfts"]],
                                      e2e_ms=[1e3 * t for t in run["latencies"]], wall_s=run["duration"],
                                      output_tok_s=run["output_throughput"],
                                      reused_blocks=run["kv_cache_reused_blocks"] or 0,
                                      missed_blocks=run["kv_cache_missed_blocks"] or 0))
                out["outputs"][name] = out["outputs"].get(name, []) + run["generated_texts"]
    return out
