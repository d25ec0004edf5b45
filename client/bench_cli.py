"""The `enginesmith bench` and `enginesmith analyze` commands (registered by builders/cli/commands_client.py)."""

from __future__ import annotations

import asyncio
import json
import math
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

# No markup: server errors, labels and paths are printed as they are.
console = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
Opt = typer.Option


def _fail(msg: str, code: int = 1) -> typer.Exit:
    err.print(Text.assemble(("error:", "red"), " ", msg))
    return typer.Exit(code)


def parse_points(concurrency: str | None, request_rate: str | None, max_concurrency: int | None, tgt):
    """--concurrency 1,2,4 / --request-rate 0.5,1,inf; default: doubling up to twice the recipe's SLA load."""
    from enginesmith.client.bench import LoadPoint

    def numbers(text: str, name: str) -> list[float]:
        try:
            vals = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise _fail(f"--{name} {text!r}: expected comma-separated numbers, e.g. 1,2,4 (rates may be inf)") from None
        if not vals or any(v <= 0 for v in vals):
            raise _fail(f"--{name} {text!r}: every value must be > 0")
        return vals

    points = [LoadPoint("concurrency", int(c)) for c in numbers(concurrency, "concurrency")] if concurrency else []
    if request_rate:
        points += [LoadPoint("rate", r, max_concurrency) for r in numbers(request_rate, "request-rate")]
    if points:
        return points
    if tgt.request_rate:
        return [LoadPoint("rate", tgt.request_rate * f, max_concurrency) for f in (0.5, 1.0, 2.0)]
    top = 2 * (tgt.concurrency or 4)
    return [LoadPoint("concurrency", 2 ** i) for i in range(int(math.log2(top)) + 1)]


def parse_goodput(items: list[str] | None, default: dict[str, float]) -> dict[str, float]:
    if not items:
        return dict(default)
    out = {}
    for item in items:
        key, _, val = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not val:
            raise _fail(f"--goodput {item!r}: expected ttft:<ms>, tpot:<ms> or e2el:<ms>")
        out[key] = float(val)
    return out


def _prompts(dataset: str, dataset_path: Path | None, tok, n: int, isl: int, osl: int, seed: int, tgt,
             shared_prefix: int = 0):
    from enginesmith.client.dataset import load_sharegpt, random_prompts

    if dataset == "random":
        return random_prompts(tok, n, isl, osl, seed, shared_prefix)
    if shared_prefix:
        raise _fail(f"--shared-prefix {shared_prefix}: only random prompts can share a prefix (--dataset random)")
    if dataset == "sharegpt":
        if dataset_path is None:
            raise _fail("--dataset sharegpt needs --dataset-path FILE.json (ShareGPT conversations format)")
        return load_sharegpt(dataset_path, tok, n, seed, tgt.max_input_len, tgt.max_seq_len)
    raise _fail(f"--dataset {dataset!r}: choose random or sharegpt")


def _plan_ref(recipe_path: Path | None):
    if recipe_path is None:
        return None
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe
    from enginesmith.client.roofline_check import PlanRef

    return PlanRef.from_plan(make_plan(load_recipe(recipe_path)))


@contextmanager
def _served(tgt, serve: bool, out: Path, backend: str = "triton"):
    """With --serve: run the recipe's repository on free 127.0.0.1 ports for the duration of the bench (and,
    for the openai backend, the OpenAI front in a child process in front of it)."""
    if not serve:
        yield tgt
        return
    if tgt.recipe_path is None:
        raise _fail("--serve needs a recipe target (it serves <out>/<name>/repo)")
    from enginesmith.triton_repo.server import ServerError, TritonServer

    repo_dir = tgt.bench_dir.parent / "repo"
    if not (repo_dir / "manifest.json").is_file():
        raise _fail(f"{repo_dir} has no repository: run `enginesmith repo {tgt.recipe_path} --out {out}` first")
    try:
        server = TritonServer(repo_dir, log_path=tgt.bench_dir.parent / "bench-server.log").start()
    except ServerError as e:
        raise _fail(str(e)) from None
    try:
        err.print(f"serving {repo_dir} at {server.grpc_url} (gRPC) for the bench", style="dim")
        live = replace(tgt, grpc_url=server.grpc_url, http_url=server.http_url, metrics_url=server.metrics_url)
        if backend != "openai":
            yield live
            return
        with _front(live, out) as url:
            yield replace(live, openai_url=url)
    finally:
        server.stop()


@contextmanager
def _front(tgt, out: Path):
    """`enginesmith openai RECIPE` on a free port, fronting the Triton of `tgt`."""
    from enginesmith.triton_repo.openai_api.runner import FrontError, FrontProcess

    front = FrontProcess(tgt.recipe_path, out=out, triton_grpc=tgt.grpc_url,
                         log_path=tgt.bench_dir.parent / "bench-openai.log")
    try:
        front.start()
    except FrontError as e:
        raise _fail(str(e)) from None
    try:
        err.print(f"[dim]OpenAI front at {front.url} for the bench[/dim]")
        yield front.url
    finally:
        front.stop()


def bench(
    target: Annotated[str, typer.Argument(help="A recipe (ports, tokenizer, SLA from it) or the gRPC host:port.")],
    model: Annotated[Optional[str], Opt(help="tensorrt_llm (token ids; default), ensemble or tensorrt_llm_bls; "
                                            "for --backend openai the served model (default: the one listed).")] = None,
    backend: Annotated[Optional[str], Opt(help="triton (gRPC streaming) or openai (streamed /v1/completions); "
                                               "default: openai for an http(s):// target.")] = None,
    openai_url: Annotated[Optional[str], Opt(help="The OpenAI front of a recipe target, http://host:port/v1 "
                                                  "(with --serve: one is started for the run).")] = None,
    out: Annotated[Path, Opt(help="Working directory root (results go to <out>/<recipe>/bench).")] = Path("out"),
    output_dir: Annotated[Optional[Path], Opt(help="Write results here instead.")] = None,
    tokenizer: Annotated[Optional[Path], Opt(help="HF tokenizer dir (default: the recipe's).")] = None,
    concurrency: Annotated[Optional[str], Opt(help="Closed-loop sweep, e.g. 1,2,4,8.")] = None,
    request_rate: Annotated[Optional[str], Opt(help="Poisson sweep in req/s, e.g. 1,2,inf.")] = None,
    max_concurrency: Annotated[Optional[int], Opt(help="Cap on requests in flight for rate points.")] = None,
    num_prompts: Annotated[int, Opt(help="Requests per load point.")] = 64,
    duration: Annotated[Optional[float], Opt(help="Stop issuing after this many seconds per point.")] = None,
    warmup: Annotated[int, Opt(help="Warm-up requests before the sweep (not measured).")] = 2,
    client_procs: Annotated[int, Opt(help="Client processes per load point, each driving a 1/N share of its "
                                          "concurrency or rate: one process saturates a core at a few thousand "
                                          "streamed responses/s.")] = 1,
    dataset: Annotated[str, Opt(help="random (exact ISL/OSL) or sharegpt.")] = "random",
    dataset_path: Annotated[Optional[Path], Opt(help="ShareGPT JSON file.")] = None,
    isl: Annotated[Optional[int], Opt(help="Input tokens per prompt (default: recipe sla.isl).")] = None,
    osl: Annotated[Optional[int], Opt(help="Output tokens per request (default: recipe sla.osl).")] = None,
    shared_prefix: Annotated[Optional[int], Opt(help="Leading tokens all random prompts share, a system prompt "
                                                    "(default: recipe sla.shared_prefix_tokens, else 0).")] = None,
    seed: Annotated[int, Opt()] = 0,
    metrics_url: Annotated[Optional[str], Opt(help="Prometheus endpoint to sample (default: the recipe's).")] = None,
    goodput: Annotated[Optional[list[str]], Opt(help="SLO, e.g. ttft:500 (repeatable; default: recipe SLA).")] = None,
    plots: Annotated[bool, Opt(help="Write PNG plots.")] = True,
    progress: Annotated[bool, Opt(help="Show a progress bar.")] = True,
    analyze_after: Annotated[bool, Opt("--analyze/--no-analyze", help="Write analysis.md after the run.")] = True,
    serve: Annotated[bool, Opt(help="Start the recipe's repository on free ports for the run, then stop it.")] = False,
) -> None:
    """Load-test a served model: concurrency or request-rate sweep, vLLM-style JSON, plots, analysis."""
    from enginesmith.client.bench import BenchConfig, run_bench
    from enginesmith.client.bench_report import summary_table, write_results
    from enginesmith.client.dataset import DatasetError
    from enginesmith.client.params import ClientError, ServerUnreachable
    from enginesmith.client.target import resolve_target
    from enginesmith.client.tokenizer import load_tokenizer

    if client_procs < 1:
        raise _fail(f"--client-procs {client_procs}: give 1 or more client processes per load point")
    try:
        tgt = resolve_target(target, out)
        backend = backend or ("openai" if tgt.openai_url else "triton")
        if backend not in ("triton", "openai"):
            raise _fail(f"--backend {backend!r}: choose triton or openai")
        if backend == "triton" and tgt.openai_url:
            raise _fail(f"target {target!r} is an OpenAI API URL: use --backend openai, or give Triton's gRPC "
                        "host:port")
        tgt = replace(tgt, openai_url=openai_url or tgt.openai_url)
        if backend == "openai" and not (tgt.openai_url or serve):
            raise _fail("--backend openai needs the front: an http://host:port/v1 target, --openai-url, or --serve")
        model = model if model is not None else ("" if backend == "openai" else "tensorrt_llm")
        tok_dir = tokenizer or tgt.tokenizer_dir
        if tok_dir is None:
            raise _fail("no tokenizer found: pass --tokenizer DIR (the model's HF tokenizer folder)")
        tok = load_tokenizer(tok_dir)
        points = parse_points(concurrency, request_rate, max_concurrency, tgt)
        n_isl, n_osl = isl or tgt.isl, osl or tgt.osl
        n_shared = tgt.shared_prefix if shared_prefix is None else shared_prefix
        if dataset != "random" and shared_prefix is None:
            n_shared = 0  # the recipe's shared prefix shapes random prompts only
        prompts = _prompts(dataset, dataset_path, tok, num_prompts * len(points) + warmup, n_isl, n_osl, seed, tgt,
                           n_shared)
        with _served(tgt, serve, out, backend) as live:
            cfg = BenchConfig(grpc_url=live.grpc_url, model=model, metrics_url=metrics_url or live.metrics_url,
                              points=points, num_prompts=num_prompts, duration_s=duration, warmup=warmup,
                              slo_ms=parse_goodput(goodput, tgt.slo_ms), seed=seed, tokenizer_id=str(tok_dir),
                              tokens_per_block=tgt.tokens_per_block, backend=backend, openai_url=live.openai_url,
                              client_procs=client_procs)
            runs = asyncio.run(run_bench(cfg, prompts, tok, show_progress=progress))
    except (ClientError, DatasetError, ValueError) as e:
        raise _fail(str(e)) from None
    except ServerUnreachable as e:
        raise _fail(f"{e} (is it up? `enginesmith serve RECIPE`, or pass --serve)", 2) from None
    dest = output_dir or tgt.bench_dir
    config = {"target": target, "backend": backend, "model": model or runs[0]["model_id"], "dataset": dataset,
              "isl": n_isl, "osl": n_osl, "shared_prefix": n_shared,
              "num_prompts": num_prompts, "points": [p.label for p in points], "slo_ms": cfg.slo_ms,
              "client_procs": client_procs}
    for r in runs:
        if r.get("client_procs_note"):
            err.print(f"{r['label']}: {r['client_procs_note']}", style="dim")
    written = write_results(runs, dest, config, plots=plots)
    (console if console.is_terminal else Console(highlight=False, width=160, markup=False)).print(summary_table(runs))
    if analyze_after:
        from enginesmith.client.analysis_report import render_markdown
        from enginesmith.client.analyze import analyze_runs
        from enginesmith.builders.manifest import atomic_write_text

        ref = _plan_ref(tgt.recipe_path)
        analyses = analyze_runs(runs, ref)
        atomic_write_text(dest / "analysis.md", render_markdown(analyses, ref))
        for a in analyses:
            console.print(a.summary)
        written["analysis"] = dest / "analysis.md"
    for name, p in written.items():
        console.print(f"{name}: {p}", style="dim")


def analyze(
    bench_json: Annotated[Path, typer.Argument(help="bench.json (all points) or one point's JSON.")],
    plan: Annotated[Optional[Path], Opt(help="Recipe whose plan gives the roofline floors.")] = None,
    markdown: Annotated[Optional[Path], Opt(
        help="Also write the report as markdown to this file (`bench` already wrote analysis.md beside its "
             "results, with the recipe's plan).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print the analysis as JSON.")] = False,
) -> None:
    """Split time into queueing / prefill / decode, compare with the plan's roofline, name what binds."""
    from enginesmith.builders.manifest import atomic_write_text
    from enginesmith.client.analysis_report import render_markdown, render_text
    from enginesmith.client.analyze import analyze_runs
    from enginesmith.client.bench_report import load_runs

    try:
        runs = load_runs(bench_json)
        ref = _plan_ref(plan)
    except ValueError as e:
        raise _fail(str(e)) from None
    analyses = analyze_runs(runs, ref)
    if markdown is not None:
        try:
            atomic_write_text(markdown, render_markdown(analyses, ref))
        except OSError as e:
            from enginesmith.builders.cli.errors import write_error

            raise _fail(write_error(e, "--markdown", markdown)) from None
    if as_json:
        console.print_json(json.dumps({"plan": ref.to_dict() if ref else None,
                                       "analyses": [a.to_dict() for a in analyses]}))
    else:
        console.print(render_text(analyses, ref))
        if markdown is not None:
            console.print(f"markdown: {markdown}", style="dim")
