"""KV-cache reuse (prefix caching): TTFT with a shared system prompt, and throughput without one, reuse on vs off.

    python -m benchmarks.prefix_reuse                          # GPU: random Llama-3-8B (bf16); CPU: the tiny llama
    python -m benchmarks.prefix_reuse --device cpu --tiny      # seconds: the committed -cpu result
    python -m benchmarks.prefix_reuse --engine-dir out/x/engine --device cuda   # a built reference engine
    python -m benchmarks.prefix_reuse --served recipes/x.yaml --out out         # tritonserver + the bench client

Workload "shared": every request is one system prompt (--system, 1024 tokens) plus --unique (64) tokens of its
own, sent in a closed loop of --concurrency requests after a warm-up on another system prompt; TTFT is arrival
to first token. The target on a GPU is a TTFT p50 at least 3x lower with reuse. Workload "unique": the same
number of prompts of the same length sharing nothing, all at once; reuse must cost no throughput (output tok/s
within noise). Each workload runs on an engine with reuse off, then one with reuse on; the greedy outputs of the
two must agree. In-process runs build `Engine`s directly (`Engine.from_engine_dir` with --engine-dir);
--served writes the recipe's Triton repository twice (reuse off / on) next to its engine, serves each on free
ports and drives it with `client.bench` (TTFT as the client sees it, hit rate from /metrics).
Results: benchmarks/results/prefix-reuse-<card>.json and .png (--out FILE/DIR elsewhere).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TTFT_TARGET = 3.0
"""GPU target: TTFT p50 without reuse / with reuse."""


def main(argv: list[str] | None = None) -> int:
    if not __package__:
        sys.exit("run this as a module from the repository root: python -m benchmarks.prefix_reuse ...")
    a = _parser().parse_args(argv)
    if a.served:
        from benchmarks.prefix_reuse_served import run_served

        results, card = run_served(a)
    else:
        results, card = run_in_process(a)
    _finish(results, card, a)
    exact = results["model"].get("dtype") == "float32"  # bf16 may round a near-tie the other way
    return 1 if exact and results["shared"]["outputs_match"] != 1.0 else 0


# ---- in-process ----------------------------------------------------------------------------------------
def run_in_process(a) -> tuple[dict, str]:
    import torch

    from enginesmith.runtime.engine.engine_config import EngineConfig

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tiny = a.tiny or device.type == "cpu"
    n = a.requests or (16 if tiny else 32)
    osl = a.osl or (8 if tiny else 32)
    isl = a.system + a.unique
    config = EngineConfig(max_batch_size=max(16, a.concurrency), max_input_len=isl, max_seq_len=isl + osl,
                          max_num_tokens=max(isl, 8192 if not tiny else isl) + max(16, a.concurrency),
                          tokens_per_block=a.tokens_per_block, dtype="bfloat16" if device.type == "cuda" else "float32",
                          enable_chunked_context=False)
    make, model_info = _engine_factory(a, device, config, tiny)
    vocab = model_info["vocab_size"]
    rng = random.Random(a.seed)
    system, warm_system = ([rng.randrange(vocab) for _ in range(a.system)] for _ in range(2))
    # fresh prompts every repeat (the same for both engines): only the system prompt is ever seen twice
    shared = [[system + [rng.randrange(vocab) for _ in range(a.unique)] for _ in range(n)] for _ in range(a.repeats)]
    unique = [[[rng.randrange(vocab) for _ in range(isl)] for _ in range(n)] for _ in range(a.repeats)]
    warm = [warm_system + [rng.randrange(vocab) for _ in range(a.unique)] for _ in range(2)]
    engines = {}
    try:
        for label in ("off", "on"):
            _progress(f"engine with reuse {label}: building")
            engines[label] = make(label == "on").start()
            closed_loop(engines[label], warm, osl, 1)  # compiles / captures both prefill sizes; prefix not reused
        runs = {label: dict(shared=[], unique=[], outputs={}) for label in engines}  # outputs in repeat order
        for rep in range(a.repeats):  # interleaved, alternating which goes first: drift hits both alike
            for label in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                _progress(f"repeat {rep + 1}/{a.repeats}, reuse {label}: shared prefix (concurrency "
                          f"{a.concurrency}), then unique prompts (all {n} at once)")
                for name, prompts, conc in (("shared", shared[rep], a.concurrency), ("unique", unique[rep], n)):
                    reqs, stats = measure(engines[label], prompts, osl, conc)
                    runs[label][name].append(stats)
                    runs[label]["outputs"].setdefault(name, []).extend(r.output for r in reqs)
    finally:
        for engine in engines.values():
            engine.shutdown()
        engines.clear()
        _free(device)
    results = dict(mode="in-process", card=card, device=str(device), model=model_info,
                   workload=dict(system_tokens=a.system, unique_tokens=a.unique, osl=osl, requests=n,
                                 concurrency=a.concurrency, repeats=a.repeats,
                                 tokens_per_block=model_info.pop("tokens_per_block", a.tokens_per_block)),
                   **compare(runs))
    return results, card


def _engine_factory(a, device, config, tiny: bool):
    """(reuse -> a new Engine, model description)."""
    import dataclasses

    from enginesmith.runtime.engine.engine import Engine

    if a.engine_dir:
        from enginesmith.runtime.model.checkpoint import CheckpointConfig
        from enginesmith.runtime.engine.engine_config import read_engine_dir
        from enginesmith.runtime.model.model import RankModel

        cfg, ckpt_dir = read_engine_dir(a.engine_dir)
        if config.max_input_len > cfg.max_input_len or config.max_seq_len > cfg.max_seq_len:
            sys.exit(f"--engine-dir {a.engine_dir}: the workload needs max_input_len >= {config.max_input_len} and "
                     f"max_seq_len >= {config.max_seq_len}; the engine has {cfg.max_input_len} / {cfg.max_seq_len}: "
                     "lower --system / --unique / --osl")
        if CheckpointConfig.from_dir(ckpt_dir).mapping.world_size != 1:
            sys.exit(f"--engine-dir {a.engine_dir}: a multi-rank engine runs one engine per process; benchmark it "
                     "with --served RECIPE (one server after the other)")
        model = RankModel.load(ckpt_dir, 0, device=device, dtype=cfg.dtype)  # once, for both engines
        limits = dataclasses.replace(config, max_batch_size=min(config.max_batch_size, cfg.max_batch_size),
                                     **{k: getattr(cfg, k) for k in ("max_input_len", "max_seq_len", "max_num_tokens",
                                                                     "tokens_per_block", "dtype")})

        def make(reuse: bool) -> Engine:
            return Engine(model, dataclasses.replace(limits, enable_kv_cache_reuse=reuse))

        return make, dict(engine_dir=str(a.engine_dir), vocab_size=model.cfg.vocab_size,
                          layers=model.num_local_layers, dtype=cfg.dtype, tokens_per_block=cfg.tokens_per_block)
    from enginesmith.runtime.model.random_model import LLAMA_3_8B, TINY_LLAMA, checkpoint_config, random_rank_model

    shape = dict(TINY_LLAMA, max_position_embeddings=8192) if tiny else LLAMA_3_8B
    ckpt = checkpoint_config(shape, dtype=config.dtype)
    _progress(f"building a random {'tiny llama' if tiny else 'Llama-3-8B'} ({ckpt.num_hidden_layers} layers, "
              f"{ckpt.dtype}) on {device}")
    model = random_rank_model(ckpt, device=device, seed=0)

    def make(reuse: bool) -> Engine:
        return Engine(model, dataclasses.replace(config, enable_kv_cache_reuse=reuse))

    info = dict(shape="tiny-llama" if tiny else "llama-3-8b", vocab_size=ckpt.vocab_size,
                layers=ckpt.num_hidden_layers, dtype=ckpt.dtype)
    return make, info


def closed_loop(engine, prompts: list[list[int]], osl: int, concurrency: int, timeout_s: float = 1800.0):
    """Send `prompts` in order, at most `concurrency` in flight (the next when one finishes); greedy, exactly
    `osl` tokens each. Returns the requests once all are done."""
    from enginesmith.runtime.engine.request import FinishReason, Request

    pending, lock, done, reqs = list(reversed(prompts)), threading.Lock(), threading.Semaphore(0), []

    def send_next() -> None:
        with lock:
            if not pending:
                return
            req = Request(pending.pop(), osl, request_id=f"r{len(reqs)}", on_update=on_update)
            reqs.append(req)
        engine.submit(req)

    def on_update(update) -> None:
        if update.finished:
            done.release()
            send_next()

    for _ in range(min(concurrency, len(prompts))):
        send_next()
    for _ in prompts:
        if not done.acquire(timeout=timeout_s):
            raise RuntimeError(f"a request did not finish within {timeout_s:.0f} s")
    bad = [r for r in reqs if r.finish_reason is not FinishReason.LENGTH]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0].request_id}: {bad[0].error}")
    return reqs


def measure(engine, prompts: list[list[int]], osl: int, concurrency: int):
    """Run one workload: (requests, their per-request TTFT / E2E in ms, wall time, throughput, blocks reused)."""
    base = (engine.cache.reused_blocks, engine.cache.missed_blocks)
    _sync(engine)
    start = time.perf_counter()
    reqs = closed_loop(engine, prompts, osl, concurrency)
    _sync(engine)
    wall = time.perf_counter() - start
    reused, missed = engine.cache.reused_blocks - base[0], engine.cache.missed_blocks - base[1]
    return reqs, dict(ttft_ms=[(r.first_token_ns - r.arrival_ns) / 1e6 for r in reqs],
                      e2e_ms=[(r.last_token_ns - r.arrival_ns) / 1e6 for r in reqs], wall_s=wall,
                      output_tok_s=sum(len(r.output) for r in reqs) / wall, reused_blocks=reused,
                      missed_blocks=missed)


def pooled(reps: list[dict]) -> dict:
    """Repeats of one workload on one engine: TTFT / E2E percentiles over every request, median throughput."""
    ttft, e2e = np.concatenate([r["ttft_ms"] for r in reps]), np.concatenate([r["e2e_ms"] for r in reps])
    reused, missed = sum(r["reused_blocks"] for r in reps), sum(r["missed_blocks"] for r in reps)
    return dict(ttft_ms_p50=float(np.median(ttft)), ttft_ms_p90=float(np.percentile(ttft, 90)),
                ttft_ms_mean=float(ttft.mean()), e2e_ms_p50=float(np.median(e2e)),
                output_tok_s=float(np.median([r["output_tok_s"] for r in reps])),
                output_tok_s_repeats=[r["output_tok_s"] for r in reps], requests=int(ttft.size),
                reused_blocks=reused, missed_blocks=missed,
                hit_rate=reused / (reused + missed) if reused + missed else None)


def compare(runs: dict) -> dict:
    """The shared and unique workloads side by side, with the ratios the targets are about."""
    out = {}
    for name in ("shared", "unique"):
        off, on = pooled(runs["off"][name]), pooled(runs["on"][name])
        same = [x == y for x, y in zip(runs["off"]["outputs"][name], runs["on"]["outputs"][name], strict=True)]
        out[name] = dict(off=off, on=on, outputs_match=sum(same) / len(same) if same else None)
    s, u = out["shared"], out["unique"]
    s["ttft_p50_speedup"] = s["off"]["ttft_ms_p50"] / s["on"]["ttft_ms_p50"]
    s["target_ttft_p50_speedup"] = TTFT_TARGET
    u["throughput_ratio"] = u["on"]["output_tok_s"] / u["off"]["output_tok_s"]
    return out


# ---- output --------------------------------------------------------------------------------------------
def _finish(results: dict, card: str, a) -> None:
    from benchmarks.runtime import _versions, write_atomic
    from benchmarks.runtime_hw import card_slug

    slug = card_slug(card)
    results.update(versions=_versions(), finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(["python -m benchmarks.prefix_reuse", *(sys.argv[1:])]))
    out = Path(a.out_file) if a.out_file else RESULTS / f"prefix-reuse-{slug}.json"
    out = out / f"prefix-reuse-{slug}.json" if out.is_dir() else out
    write_atomic(out, json.dumps(results, indent=2))
    png = plot(results, out.with_suffix(".png"))
    print(summary(results))
    print(f"results: {out}" + (f", {png}" if png else ""))


def summary(r: dict) -> str:
    s, u = r["shared"], r["unique"]
    rows = [("workload", "metric", "reuse off", "reuse on", "ratio")]
    rows.append(("shared", "TTFT p50 ms", f"{s['off']['ttft_ms_p50']:.2f}", f"{s['on']['ttft_ms_p50']:.2f}",
                 f"{s['ttft_p50_speedup']:.2f}x lower (target >= {TTFT_TARGET:g}x on a GPU)"))
    rows.append(("shared", "TTFT p90 ms", f"{s['off']['ttft_ms_p90']:.2f}", f"{s['on']['ttft_ms_p90']:.2f}", ""))
    rows.append(("shared", "hit rate", _pct(s["off"].get("hit_rate")), _pct(s["on"].get("hit_rate")), ""))
    rows.append(("shared", "same greedy outputs", "", _pct(s["outputs_match"]), ""))
    rows.append(("unique", "output tok/s", f"{u['off']['output_tok_s']:.1f}", f"{u['on']['output_tok_s']:.1f}",
                 f"{u['throughput_ratio']:.3f} (on / off)"))
    rows.append(("unique", "same greedy outputs", "", _pct(u["outputs_match"]), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def plot(r: dict, path: Path) -> Path | None:
    """TTFT of the shared workload and throughput of the unique one, reuse off vs on (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    s, u = r["shared"], r["unique"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(2)
    for i, (stat, label) in enumerate((("ttft_ms_p50", "p50"), ("ttft_ms_p90", "p90"))):
        ax1.bar(x + (i - 0.5) * 0.38, [s["off"][stat], s["on"][stat]], 0.38, label=label)
    ax1.set_xticks(x, ["reuse off", "reuse on"])
    ax1.set_ylabel("TTFT (ms)")
    ax1.set_title(f"shared {r['workload']['system_tokens']}-token prefix + {r['workload']['unique_tokens']} "
                  f"own: {s['ttft_p50_speedup']:.2f}x", fontsize=10)
    ax1.legend()
    ax2.bar(x, [u["off"]["output_tok_s"], u["on"]["output_tok_s"]], 0.5, color=["tab:gray", "tab:green"])
    ax2.set_xticks(x, ["reuse off", "reuse on"])
    ax2.set_ylabel("output tokens/s")
    ax2.set_title(f"no shared prefix: on/off {u['throughput_ratio']:.3f}", fontsize=10)
    fig.suptitle(f"KV-cache reuse, {r['card']} ({r['mode']})", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)  # never half-written under its final name
    return path


# ---- helpers -------------------------------------------------------------------------------------------
def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sync(engine) -> None:
    import torch

    if engine.model.device.type == "cuda":
        torch.cuda.synchronize(engine.model.device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prefix_reuse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", help="cuda (default if present) | cpu | cuda:N (in-process runs)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random llama (always on the CPU)")
    ap.add_argument("--engine-dir", help="a reference engine directory (Engine.from_engine_dir) instead of a "
                                         "random model")
    ap.add_argument("--served", metavar="RECIPE", help="serve the recipe's engine through tritonserver instead")
    ap.add_argument("--out", default="out", help="--served: the recipe's working directory root")
    ap.add_argument("--out-file", help="results JSON, or a folder for prefix-reuse-<card>.json "
                                       "(default benchmarks/results/)")
    ap.add_argument("--system", type=int, default=1024, help="shared system prompt tokens")
    ap.add_argument("--unique", type=int, default=64, help="tokens of each request's own")
    ap.add_argument("--osl", type=int, help="output tokens per request (default 32; tiny 8)")
    ap.add_argument("--requests", type=int, help="requests per workload (default 32; tiny 16)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight in the shared workload")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each workload per engine, interleaved")
    ap.add_argument("--tokens-per-block", type=int, default=32, help="in-process (--served: the recipe's)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


if __name__ == "__main__":
    sys.exit(main())

