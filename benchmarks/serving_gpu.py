"""Served throughput and latency on one GPU, through what users run, next to the in-process engine.

    python -m benchmarks.serving_gpu                      # Llama-3-8B shape, bf16, random weights (one GPU)
    python -m benchmarks.serving_gpu --tiny               # the pipeline on CPU with a tiny model (a check)
    python -m benchmarks.serving_gpu --engine-process both --layers 16   # a server per variant (trimmed model)

In one run, on one card: writes a random-weight Hugging Face checkpoint of the shape and a synthetic word-level
tokenizer of its vocabulary, then `enginesmith plan -> convert -> build -> repo` on a recipe for it, and measures
the same workload (ISL/OSL exact, all requests greedy to their full length) three ways:
  (a) in process: `Engine.from_engine_dir` (the engine the server loads) driven by a closed loop,
  (b) `enginesmith serve` + `enginesmith bench --model tensorrt_llm` (token ids over gRPC),
  (c) the same server + `enginesmith bench --model ensemble` (text: preprocessing -> engine -> postprocessing),
each at concurrency 1 and at a saturating concurrency. `--engine-process on` serves the engine from a process of
its own (recipe serve.engine_process), `both` runs the served stage once per variant (a server each: about twice
its time); results keep them as `served` (the engine in the stub's thread) and `served_engine_process`, and the
summary compares each with the in-process engine. The physical limit of the workload on the card is computed
beside them: weights + KV bytes of every decode step at the measured copy bandwidth, prefill FLOPs at the measured
bf16 matmul rate. Results: benchmarks/results/serving-<card>.json + .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def log(msg: str) -> None:
    print(f"[serving_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- inputs: a checkpoint, a tokenizer, a recipe ---------------------------------------------------------------
def word(i: int) -> str:
    """A distinct lower-case word for every index (base 26)."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(97 + r) + s
    return s


def make_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer with exactly `vocab_size` ids, each a word with a leading space (byte-level), so every
    id the random model samples decodes to text and random prompts of exact length are easy to build."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    n = len(vocab)
    while len(vocab) < vocab_size:
        vocab["\u0120" + word(len(vocab) - n)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(out_dir))


def make_checkpoint(out_dir: Path, shape: str, layers: int | None, tiny: bool) -> dict:
    """HF safetensors + config.json + tokenizer; returns the config. Reuses the conversion benchmark's writer."""
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file():
        return json.loads((out_dir / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    if tiny:
        from enginesmith.builders.tiny_model import make_tiny_model

        make_tiny_model(out_dir, "llama")
        cfg = json.loads((out_dir / "config.json").read_text())
    else:
        from benchmarks.convert import hf_config, write_synthetic

        cfg = hf_config(shape, layers)
        t = time.perf_counter()
        size = write_synthetic(out_dir, cfg)
        log(f"checkpoint: {size / 1e9:.1f} GB of bf16 weights in {time.perf_counter() - t:.0f} s")
    make_tokenizer(out_dir, cfg["vocab_size"])
    return cfg


def write_recipe(path: Path, name: str, source: Path, args, gpu: str, engine_process: bool = False) -> None:
    import yaml

    isl, osl = args.isl, args.osl
    recipe = {
        "name": name,
        "model": {"source": str(source), "dtype": "float32" if args.tiny else "bfloat16"},
        "hardware": ({"gpu": "custom", "memory_gb": 4, "hbm_gbps": 20, "tflops": {"float32": 0.2},
                      "compute_capability": 80, "gpus_per_node": 1} if args.tiny else {"gpu": gpu, "gpus_per_node": 1}),
        "parallel": {"tp_size": 1, "pp_size": 1},
        "build": {"target": "reference", "max_batch_size": args.max_batch_size, "max_input_len": isl,
                  "max_seq_len": isl + osl, "max_num_tokens": args.max_num_tokens,
                  "tokens_per_block": 16 if args.tiny else 32},
        "serve": {"enable_chunked_context": True, "kv_cache_free_gpu_mem_fraction": 0.5 if args.tiny else 0.9,
                  "triton_max_batch_size": args.max_batch_size, "decoupled": True,
                  "stream_interval": args.stream_interval,
                  "http_port": args.ports[0], "grpc_port": args.ports[1], "metrics_port": args.ports[2],
                  "engine_process": engine_process},
        "sla": {"ttft_ms": 100000, "tpot_ms": 10000, "concurrency": max(args.concurrency), "isl": isl, "osl": osl},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def cli(*argv: str, timeout: float = 1800) -> str:
    """`enginesmith ARGV` with this interpreter; its output (raises with the tail on failure)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "enginesmith.builders.cli", *argv], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    if p.returncode:
        raise RuntimeError(f"enginesmith {' '.join(argv)} exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
    log(f"enginesmith {argv[0]} done in {time.perf_counter() - t:.0f} s")
    return p.stdout


# ---- (a) the in-process engine -----------------------------------------------------------------------------------
def in_process(engine_dir: str, concurrency: list[int], num_prompts: int, isl: int, osl: int, vocab: int,
               out_json: str) -> None:
    """Runs in a child process (frees the GPU for the server after): each concurrency point as a closed loop."""
    import torch

    from enginesmith.runtime.engine.engine import Engine
    from enginesmith.runtime.engine.request import FinishReason, Request
    from enginesmith.runtime.engine.sampler import SamplingParams

    t0 = time.perf_counter()
    engine = Engine.from_engine_dir(engine_dir)
    setup_s = time.perf_counter() - t0
    log(f"in-process engine ready in {setup_s:.0f} s ({engine.cache.num_blocks} KV blocks)")
    engine.start()
    rng = random.Random(0)
    res = dict(setup_s=setup_s, kv_blocks=engine.cache.num_blocks,
               decoder=engine.fast_decoder.status() if engine.fast_decoder is not None else None, points=[])

    # what the bench client sends: the tokenizer's end id, and min_tokens = the output length (ignore_eos)
    sampling = SamplingParams(end_id=SPECIALS.index("</s>"), min_tokens=osl)

    def point(c: int, n: int) -> dict:
        prompts = [[rng.randrange(len(SPECIALS), vocab) for _ in range(isl)] for _ in range(n)]
        done, cv = [], threading.Condition()
        first: dict[int, float] = {}
        state = dict(next=0)
        reqs: list[Request] = []

        def submit() -> None:
            i = state["next"]
            state["next"] += 1
            r = Request(prompts[i], osl, sampling, request_id=f"p{c}-{i}", on_update=lambda u, i=i: update(i, u))
            r.t_submit = time.perf_counter()
            reqs.append(r)
            engine.submit(r)

        def update(i: int, u) -> None:
            now = time.perf_counter()
            if u.new_tokens and i not in first:
                first[i] = now
            if u.finished:
                with cv:
                    done.append((i, now))
                    if state["next"] < n:
                        submit()
                    cv.notify()

        torch.cuda.synchronize() if torch.cuda.is_available() else None
        start = time.perf_counter()
        with cv:
            for _ in range(min(c, n)):
                submit()
            while len(done) < n:
                cv.wait(timeout=600)
        elapsed = time.perf_counter() - start
        bad = [r for r in reqs if r.finish_reason is not FinishReason.LENGTH or len(r.output) != osl]
        if bad:
            raise RuntimeError(f"{len(bad)} requests ended early, e.g. {bad[0].finish_reason} {bad[0].error}")
        ttft = [first[int(r.request_id.split("-")[1])] - r.t_submit for r in reqs]
        ends = dict(done)
        tpot = [(ends[int(r.request_id.split("-")[1])] - first[int(r.request_id.split("-")[1])]) / (osl - 1)
                for r in reqs]
        return dict(concurrency=c, completed=n, elapsed_s=elapsed, output_throughput=n * osl / elapsed,
                    median_ttft_ms=1e3 * statistics.median(ttft), median_tpot_ms=1e3 * statistics.median(tpot),
                    mean_tpot_ms=1e3 * statistics.mean(tpot))

    point(1, 2)  # warm-up
    for c in concurrency:
        res["points"].append(point(c, prompts_at(c, num_prompts)))
        log(f"in-process c={c}: {res['points'][-1]['output_throughput']:.0f} tok/s, "
            f"TPOT p50 {res['points'][-1]['median_tpot_ms']:.2f} ms")
    engine.shutdown()
    Path(out_json).write_text(json.dumps(res, indent=1))


# ---- (b), (c) the server ----------------------------------------------------------------------------------------
def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float) -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"enginesmith serve exited with {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


SERVED_KEYS = {False: "served", True: "served_engine_process"}
"""Results key of each served variant: the engine in the stub's thread, or in a process of its own."""


def served(recipe: Path, out: Path, args, tokenizer_dir: Path, save, engine_process: bool = False) -> dict:
    """`enginesmith serve` in the background; one `enginesmith bench` per (model, concurrency) point against it.
    The recipe's serve.engine_process decides where the engine runs (ENGINESMITH_ENGINE_PROCESS is unset)."""
    tag = "-engine-process" if engine_process else ""
    log_path = out / f"serve{tag}.log"
    env = {k: v for k, v in os.environ.items() if k != "ENGINESMITH_ENGINE_PROCESS"}
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "enginesmith.builders.cli", "serve", str(recipe),
                                 "--out", str(out), "--ready-timeout", "900"], cwd=REPO_ROOT, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    res: dict = {"engine_process": engine_process}
    try:
        res["ready_s"] = wait_ready(args.ports[0], proc, 900)
        log(f"enginesmith serve ready in {res['ready_s']:.0f} s ({SERVED_KEYS[engine_process]})")
        for model in args.models:
            res[model] = []
            for c in args.concurrency:
                dest = out / f"bench{tag}-{model}-c{c}"
                cli("bench", str(recipe), "--out", str(out), "--model", model, "--concurrency", str(c),
                    "--num-prompts", str(prompts_at(c, args.num_prompts)), "--isl", str(args.isl),
                    "--osl", str(args.osl), "--output-dir", str(dest), "--no-plots", "--no-progress",
                    "--no-analyze", "--warmup", "4", "--tokenizer", str(tokenizer_dir),
                    "--client-procs", str(1 if c == 1 else args.client_procs))
                r = json.loads((dest / "bench.json").read_text())["runs"][0]
                res[model].append(dict(concurrency=c, completed=r["completed"], failed=r.get("failed", 0),
                                       client_procs=r.get("client_procs", 1),
                                       client_cpu_utilization_max_proc=r.get("client_cpu_utilization_max_proc"),
                                       output_throughput=r["output_throughput"], median_ttft_ms=r["median_ttft_ms"],
                                       median_tpot_ms=r["median_tpot_ms"], mean_tpot_ms=r.get("mean_tpot_ms"),
                                       client_cpu_utilization=r.get("client_cpu_utilization")))
                log(f"{SERVED_KEYS[engine_process]} {model} c={c}: {r['output_throughput']:.0f} tok/s, TPOT p50 "
                    f"{r['median_tpot_ms']:.2f} ms, failed {r.get('failed', 0)}, bench client CPU "
                    f"{r.get('client_cpu_utilization_max_proc') or r.get('client_cpu_utilization') or 0:.0%} of a core")
                save(res)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        res["serve_log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
    return res


def prompts_at(concurrency: int, num_prompts: int) -> int:
    """Requests of one point: a few at concurrency 1 (latency), `num_prompts` otherwise."""
    return min(num_prompts, 8) if concurrency == 1 else num_prompts


# ---- the workload's physical limit ------------------------------------------------------------------------------
def physical_limit(cfg: dict, isl: int, osl: int, concurrency: int, copy_gbps: float, tflops: float,
                   bytes_per_param: int = 2) -> dict:
    """Output tokens/s if every decode step only streamed weights + the batch's KV at the copy bandwidth and every
    prompt's prefill ran at the matmul rate (the batch stays full: `concurrency` sequences at the mean context)."""
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    params = n * per_layer + 2 * v * h
    kv_token = 2 * n * kv * bytes_per_param
    step_bytes = (params - v * h) * bytes_per_param + concurrency * kv_token * (isl + osl / 2)
    step_s = step_bytes / (copy_gbps * 1e9)
    prefill_s = 2 * (params - v * h) * isl / (tflops * 1e12)  # per request
    per_token_s = step_s / concurrency + prefill_s / osl
    return dict(params=params, kv_bytes_per_token=kv_token, decode_step_bytes=step_bytes, decode_step_ms=1e3 * step_s,
                prefill_ms_per_request=1e3 * prefill_s, output_tok_s=1 / per_token_s, concurrency=concurrency)


def card_figures(tiny: bool) -> dict:
    import torch

    if tiny or not torch.cuda.is_available():
        return dict(card="cpu", copy_gbps=None, matmul_tflops=None)
    from benchmarks.runtime_hw import copy_bandwidth, matmul_rate

    dev = torch.device("cuda")
    out = dict(card=torch.cuda.get_device_name(dev), **copy_bandwidth(dev, 1 << 30),
               **matmul_rate(dev, 8192, torch.bfloat16))
    torch.cuda.empty_cache()
    return out


def plot(res: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series = [("in-process engine", res["in_process"]["points"])]
    for key in SERVED_KEYS.values():
        label = "served" if key == "served" else "served, engine process"
        series += [(f"{label}: {m}", res[key][m]) for m in res["models"] if m in res.get(key, {})]
    width = 0.8 / len(series)
    concs = sorted({p["concurrency"] for _, pts in series for p in pts})
    for k, (name, pts) in enumerate(series):
        by = {p["concurrency"]: p for p in pts}
        xs = [j + k * width for j, c in enumerate(concs) if c in by]
        ax1.bar(xs, [by[c]["output_throughput"] for c in concs if c in by], width, label=name)
        ax2.bar(xs, [by[c]["median_tpot_ms"] for c in concs if c in by], width, label=name)
    lim = res.get("physical_limit", {}).get("output_tok_s")
    if lim:
        ax1.axhline(lim, color="k", ls="--", lw=1, label=f"physical limit at c={res['physical_limit']['concurrency']}")
    for ax, title in ((ax1, "output tokens/s"), (ax2, "TPOT p50 (ms)")):
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(concs))], [f"c={c}" for c in concs])
        ax.set_title(title)
    ax1.legend(fontsize=7)
    fig.suptitle(f"{res['shape']} ({res['card']}): ISL {res['isl']} / OSL {res['osl']}, {res['num_prompts']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(res: dict) -> dict:
    """The issue's targets as ratios, from the measured points: each served variant against the in-process engine
    (`served_*` keys: the engine in the stub's thread; `served_engine_process_*`: in its own process)."""
    inp = {p["concurrency"]: p for p in res["in_process"]["points"]}
    out = {}
    top = max(inp)
    for key in SERVED_KEYS.values():
        if key not in res:
            continue
        trt = {p["concurrency"]: p for p in res[key].get("tensorrt_llm", [])}
        ens = {p["concurrency"]: p for p in res[key].get("ensemble", [])}
        ensemble = "ensemble" if key == "served" else "engine_process_ensemble"
        if top in trt:
            out[f"{key}_vs_in_process_throughput"] = trt[top]["output_throughput"] / inp[top]["output_throughput"]
        if top in trt and top in ens:
            out[f"{ensemble}_vs_tensorrt_llm_throughput"] = (ens[top]["output_throughput"]
                                                            / trt[top]["output_throughput"])
        if 1 in trt and 1 in inp:
            out[f"{key}_c1_tpot_vs_in_process"] = trt[1]["median_tpot_ms"] / inp[1]["median_tpot_ms"]
        if top in trt and res.get("physical_limit"):
            out[f"{key}_vs_physical_limit"] = trt[top]["output_throughput"] / res["physical_limit"]["output_tok_s"]
    out["targets"] = dict(served_vs_in_process_throughput=">= 0.95", ensemble_vs_tensorrt_llm_throughput=">= 0.90",
                          served_c1_tpot_vs_in_process="<= 1.05", saturated_output_tok_s=">= 8000 (H100, c=256)",
                          engine_process="the same targets for the served_engine_process_* ratios")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=None, help="trim the layer count (default: the shape's)")
    ap.add_argument("--tiny", action="store_true", help="CPU check with the tiny llama")
    ap.add_argument("--work", type=Path, default=Path("/tmp/enginesmith-serving-gpu"))
    ap.add_argument("--isl", type=int, default=512)
    ap.add_argument("--osl", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--concurrency", default="1,256")
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--max-num-tokens", type=int, default=8192)
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="serve.stream_interval of the served recipe (1: a response per token)")
    ap.add_argument("--models", default="tensorrt_llm,ensemble")
    ap.add_argument("--client-procs", type=int, default=4,
                    help="bench --client-procs at the saturating concurrency (c=1 runs in one client process)")
    ap.add_argument("--engine-process", choices=("off", "on", "both"), default="off",
                    help="served stage with the engine in the stub's thread (off), in its own process (on), or "
                         "both (a server each)")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: in_process,served")
    ap.add_argument("--results", type=Path, default=None, help="results JSON (default: results/serving-<card>.json)")
    ap.add_argument("--inprocess-child", nargs=2, metavar=("ENGINE_DIR", "OUT_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.models = [m for m in args.models.split(",") if m]
    if args.tiny:
        args.isl, args.osl = min(args.isl, 64), min(args.osl, 32)
        args.max_batch_size = min(args.max_batch_size, 16)
        args.max_num_tokens = min(args.max_num_tokens, 1024)
    if args.inprocess_child:
        cfg = json.loads((args.work / "hf" / "config.json").read_text())
        return in_process(args.inprocess_child[0], args.concurrency, args.num_prompts, args.isl, args.osl,
                          cfg["vocab_size"], args.inprocess_child[1])
    from enginesmith.triton_repo.server import free_endpoints

    ep = free_endpoints()
    args.ports = (ep.http_port, ep.grpc_port, ep.metrics_port)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    hw = card_figures(args.tiny)
    from benchmarks.runtime_hw import card_slug

    slug = "cpu" if args.tiny else card_slug(hw["card"])
    gpu = {"h100": "H100", "h200": "H200"}.get(slug, "H100")
    cfg = make_checkpoint(work / "hf", args.shape, args.layers, args.tiny)
    name = "serving-bench"
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.engine_process]
    recipes = {ep: work / f"{name}{'-engine-process' if ep else ''}.yaml" for ep in variants}
    for ep, path in recipes.items():  # one deployment (same name, so same folder); serve.engine_process differs
        write_recipe(path, name, work / "hf", args, gpu, engine_process=ep)
    recipe = recipes[variants[0]]
    out = work / "out"
    for stage in ("plan", "convert", "build", "repo"):
        cli(stage, str(recipe), *(("--out", str(out)) if stage != "plan" else ()))
    engine_dir = out / name / "engine"
    res = dict(shape="tiny-llama" if args.tiny else args.shape, layers=cfg["num_hidden_layers"], card=hw["card"],
               hw=hw, isl=args.isl, osl=args.osl, num_prompts=args.num_prompts, concurrency=args.concurrency,
               max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens, models=args.models,
               stream_interval=args.stream_interval, engine_process=args.engine_process,
               python=sys.version.split()[0])
    import numpy

    res["numpy"] = numpy.__version__
    res["client_procs"] = args.client_procs  # the saturating points' bench --client-procs
    skip = set(args.skip.split(","))
    dest = args.results or RESULTS / f"serving-{slug}.json"

    def save() -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(res, indent=1))

    if "in_process" not in skip:
        child = work / "in_process.json"
        subprocess.run([sys.executable, "-m", "benchmarks.serving_gpu", "--work", str(work), "--isl", str(args.isl),
                        "--osl", str(args.osl), "--num-prompts", str(args.num_prompts),
                        "--concurrency", ",".join(map(str, args.concurrency)), *(["--tiny"] if args.tiny else []),
                        "--inprocess-child", str(engine_dir), str(child)], cwd=REPO_ROOT, check=True, timeout=1800)
        res["in_process"] = json.loads(child.read_text())
        save()
    for ep in variants if "served" not in skip else []:
        key = SERVED_KEYS[ep]

        def partial(served_res: dict, key: str = key) -> None:
            res[key] = served_res
            save()

        res[key] = served(recipes[ep], out, args, out / name / "checkpoint" / "tokenizer", partial, ep)
    if hw.get("copy_gbps"):
        res["physical_limit"] = physical_limit(cfg, args.isl, args.osl, max(args.concurrency), hw["copy_gbps"],
                                               hw["matmul_tflops"])
    if "in_process" in res and any(key in res for key in SERVED_KEYS.values()):
        res["summary"] = summarize(res)
        plot(res, dest.with_suffix(".png"))
    save()
    log(f"results: {dest}")
    print(json.dumps(res.get("summary", {}), indent=1))


if __name__ == "__main__":
    main()
