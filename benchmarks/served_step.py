"""Host time of one engine step at many rows, on CPU: the engine in process against the engine as served.

    ENGINESMITH_FAST_DECODE=on python -m benchmarks.served_step              # 256 rows, tiny llama
    ENGINESMITH_FAST_DECODE=on python -m benchmarks.served_step --rows 256 --osl 64 --repeats 3

The same tiny-llama Engine is driven synchronously (Engine.step in this thread) over `rows` requests that decode
together, two ways:
  in_process: as benchmarks/serving_gpu.py's in-process stage: the engine directory's defaults, the bench
      client's sampling parameters (end_id, min_tokens = OSL), a callback that keeps nothing, no metrics hook;
  served: as `enginesmith serve` with serve.engine_process runs it: the recipe's serving options (chunked
      context) and an iteration log file, requests built by the tensorrt_llm model's parse_rows from the tensors
      `enginesmith bench` sends (streaming, min_tokens, end_id, return_perf_metrics), the engine process's
      callbacks and metrics hook (EngineCore, MetricsCalls), and its step message sent through a pipe to a
      process that applies it as the serving side does (EngineProcess._apply, then the metrics replay).
Per pure-decode step of `rows` rows: the engine thread's CPU time by section (scheduling, the fast decoder's
plan and staging, the model, sampling, the per-row appends with their callbacks, the iteration record, the step
message), garbage collections, and the serving side's CPU per message. With the tiny model the model's share is
small, so the rest is host work that a GPU step pays as well (OMP_NUM_THREADS=1 keeps torch to this thread).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

END_ID = 2
SECTIONS = ("schedule", "plan", "stage", "model", "sample", "append", "record", "step message")


def engine_dir(work: Path, rows: int, isl: int, osl: int) -> Path:
    """A tiny llama checkpoint (made once under `work`) and a reference engine directory for `rows` rows."""
    from enginesmith.builders.convert import convert_checkpoint
    from enginesmith.builders.mapping import Mapping
    from enginesmith.builders.model_spec import ModelSpec
    from enginesmith.builders.tiny_model import make_tiny_model

    hf, ckpt, out = work / "hf", work / "ckpt", work / f"engine-{rows}-{isl}-{osl}"
    if not (hf / "config.json").is_file():
        make_tiny_model(hf, "llama")
    if not (ckpt / "config.json").is_file():
        convert_checkpoint(hf, ckpt, Mapping.create(1, 1), ModelSpec.from_pretrained_dir(hf), "float32", "none",
                           workers=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_config.json").write_text(json.dumps(dict(
        target="reference", checkpoint_dir=str(ckpt), max_batch_size=rows, max_input_len=isl, max_seq_len=isl + osl,
        max_num_tokens=8192, max_beam_width=1, tokens_per_block=16, dtype="float32")))
    return out


def prompts(n: int, isl: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 300) for _ in range(isl)] for _ in range(n)]


class _Clock:
    """Thread CPU time spent in wrapped callables, per label, since `mark`."""

    def __init__(self):
        self.spent: dict[str, int] = {}

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.thread_time_ns()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0) + time.thread_time_ns() - t

        setattr(owner, name, timed)

    def take(self) -> dict[str, int]:
        out, self.spent = self.spent, {}
        return out


def serving_side(conn: Any, prompts_: list[list[int]], max_new_tokens: int) -> None:
    """The serving side of the engine process, in a process of its own as served: applies each step message to
    mirror requests (EngineProcess._handle) until ("done",), then answers with its CPU time per message."""
    from enginesmith.runtime.engine.engine_config import EngineConfig
    from enginesmith.runtime.engine.engine_process import EngineProcess
    from enginesmith.runtime.engine.request import Request

    class _Proc:
        pid = 0

    class _Hooks:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    side = EngineProcess(_Proc(), None, EngineConfig(), vocab_size=1, num_blocks=1)
    side.metrics = _Hooks()
    mirrors = {key: Request(p, max_new_tokens, on_update=lambda u: None) for key, p in enumerate(prompts_)}
    side._live = dict(mirrors)
    cpu_ns = messages = 0
    while (msg := conn.recv())[0] != "done":
        t = time.thread_time_ns()
        side._handle(msg)
        cpu_ns += time.thread_time_ns() - t
        messages += 1
    conn.send((cpu_ns, messages, [side._live.get(k) is None and r.output for k, r in sorted(mirrors.items())]))


def run(way: str, eng: Path, rows: int, isl: int, osl: int, work: Path) -> dict:
    from enginesmith.client.params import GenerateParams, build_inputs
    from enginesmith.runtime.engine import engine as engine_module
    from enginesmith.runtime.engine.engine import Engine
    from enginesmith.runtime.engine.engine_process import EngineCore, MetricsCalls
    from enginesmith.runtime.engine.request import Request
    from enginesmith.runtime.engine.sampler import SamplingParams
    from enginesmith.runtime.engine.tensor_contract import parse_rows

    served = way == "served"
    log_path = work / "iterations.jsonl"
    log_path.unlink(missing_ok=True)
    overrides = dict(enable_chunked_context=True, batch_scheduler_policy="guaranteed_no_evict",
                     kv_cache_free_gpu_mem_fraction=0.9, iteration_log_path=str(log_path)) if served else {}
    engine = Engine.from_engine_dir(eng, device="cpu", **overrides)
    clock = _Clock()
    for owner, name, label in ((engine.scheduler, "schedule", "schedule"), (engine, "_append", "append"),
                               (engine, "_record", "record"), (engine_module, "sample", "sample")):
        clock.wrap(owner, name, label)
    if engine.fast_decoder is not None:
        for name, label in (("plan", "plan"), ("_stage", "stage"), ("_run", "model")):
            clock.wrap(engine.fast_decoder, name, label)
    else:
        clock.wrap(engine, "_forward", "model")
    serving, reqs = None, []
    if served:
        ours, theirs = multiprocessing.Pipe()
        serving = multiprocessing.get_context("spawn").Process(target=serving_side,
                                                               args=(theirs, prompts(rows, isl), osl))
        serving.start()
        core = EngineCore(ours)
        engine.metrics = MetricsCalls(core)
        clock.wrap(core, "flush", "step message")
        engine.on_step_end = core.flush
        for key, p in enumerate(prompts(rows, isl)):
            tensors = build_inputs(GenerateParams(input_ids=p, max_tokens=osl, stream=True, min_tokens=osl,
                                                  end_id=END_ID, pad_id=0, return_perf_metrics=True), "tokens", True)
            (spec,) = parse_rows(tensors, decoupled=True, exclude_input_default=True)
            r = Request(spec.prompt, spec.max_new_tokens, spec.sampling,
                        on_update=lambda u, key=key: core._updated(key, u))
            core._requests[key] = r
            reqs.append(r)
            engine.submit(r)
    else:
        sampling = SamplingParams(end_id=END_ID, min_tokens=osl)
        for p in prompts(rows, isl):
            reqs.append(Request(p, osl, sampling, on_update=lambda u: None))
            engine.submit(reqs[-1])
    steps: list[tuple[dict[str, int], int, int]] = []
    new, engine._inbox = engine._inbox, []
    while new or engine.scheduler.has_work():
        s = engine.scheduler
        decode = not new and not s.waiting and len(s.running) == rows and all(r.context_done for r in s.running)
        collections = sum(g["collections"] for g in gc.get_stats())
        clock.take()
        t = time.thread_time_ns()
        engine.step(new)
        if engine.on_step_end is not None:
            engine.on_step_end()
        cpu = time.thread_time_ns() - t
        new = []
        if decode:
            steps.append((clock.take(), cpu, sum(g["collections"] for g in gc.get_stats()) - collections))
    engine.shutdown()
    serving_cpu, outputs = None, [r.output for r in reqs]
    if serving is not None:
        ours.send(("done",))
        cpu_ns, messages, mirrored = ours.recv()
        serving.join(30)
        serving_cpu = cpu_ns / max(messages, 1) / 1e3
        if mirrored != outputs:
            raise RuntimeError("the serving side's requests do not hold what the engine generated")

    def p50(values: list[float]) -> float:
        return round(statistics.median(values), 4)

    out = dict(way=way, rows=rows, decode_steps=len(steps), cpu_ms=p50([c / 1e6 for _, c, _ in steps]),
               sections_ms={k: p50([s.get(k, 0) / 1e6 for s, _, _ in steps]) for k in SECTIONS},
               gc_collections_per_step=round(sum(g for _, _, g in steps) / max(len(steps), 1), 3))
    out["outputs"] = outputs
    out["host_ms"] = round(out["cpu_ms"] - out["sections_ms"]["model"], 4)
    out["host_us_per_row"] = round(1e3 * out["host_ms"] / rows, 2)
    if serving_cpu is not None:
        out["serving_side_us_per_message"] = round(serving_cpu, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--isl", type=int, default=32)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each way, alternating (medians are reported)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "enginesmith-served-step")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if os.environ.get("ENGINESMITH_FAST_DECODE", "") != "on":
        print("note: ENGINESMITH_FAST_DECODE=on runs the fast decode path (as on a GPU) on the CPU")
    args.work.mkdir(parents=True, exist_ok=True)
    eng = engine_dir(args.work, args.rows, args.isl, args.osl)
    runs: dict[str, list[dict]] = {"in_process": [], "served": []}
    for i in range(args.repeats):
        for way in list(runs)[:: 1 if i % 2 == 0 else -1]:  # each way first as often
            runs[way].append(run(way, eng, args.rows, args.isl, args.osl, args.work))
    outputs = {tuple(map(tuple, r.pop("outputs"))) for rs in runs.values() for r in rs}
    res = {way: _median(rs) for way, rs in runs.items()}
    res["outputs_match"] = len(outputs) == 1
    a, b = res["in_process"], res["served"]
    print(f"{args.rows} rows, per pure-decode step (engine thread CPU, medians of {args.repeats} runs):")
    print(f"{'':14s} {'in process':>11s} {'served':>9s}")
    for k in SECTIONS:
        print(f"{k:14s} {a['sections_ms'][k]:9.3f}ms {b['sections_ms'][k]:7.3f}ms")
    print(f"{'host (no model)':14s} {a['host_ms']:9.3f}ms {b['host_ms']:7.3f}ms  "
          f"({a['host_us_per_row']:.1f} / {b['host_us_per_row']:.1f} us per row)")
    print(f"{'GC per step':14s} {a['gc_collections_per_step']:11.2f} {b['gc_collections_per_step']:9.2f}")
    print(f"serving side: {b.get('serving_side_us_per_message', 0):.0f} us CPU per step message; outputs "
          f"{'the same' if res['outputs_match'] else 'DIFFER'} both ways")
    out = dict(rows=args.rows, isl=args.isl, osl=args.osl, repeats=args.repeats, runs=runs, medians=res)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


def _median(runs: list[dict]) -> dict:
    first = runs[0]
    out: dict[str, Any] = {}
    for k, v in first.items():
        if isinstance(v, dict):
            out[k] = {kk: round(statistics.median(r[k][kk] for r in runs), 4) for kk in v}
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = round(statistics.median(r[k] for r in runs), 4)
        else:
            out[k] = v
    return out


if __name__ == "__main__":
    main()
