"""Conversion throughput and memory on a synthetic Llama checkpoint of a real shape, next to `cp`.

    .venv/bin/python benchmarks/convert.py                    # Llama-3-8B shape, bf16, ~16 GB
    .venv/bin/python benchmarks/convert.py --layers 8         # trimmed to fit a small disk
    .venv/bin/python benchmarks/convert.py --shape llama-3-70b --layers 4

Writes HF-style shards (~5 GB each, with an index) under --workdir, then in one run: times `cp` of the
same bytes on the same disk (plus fsync, as the converter fsyncs), converts at tp=2 pp=2 and tp=8 in a
child process each, and reports GB/s written, the ratio to the copy rate and the child's peak RSS (ru_maxrss).
Targets (issue 3): >= 0.8x the copy rate; peak RSS < 1.5 GB + the largest single tensor.
Results: benchmarks/results/convert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
LAYOUTS = {"tp2-pp2": dict(tp_size=2, pp_size=2), "tp8": dict(tp_size=8)}
RESULTS = Path(__file__).resolve().parent / "results" / "convert.json"
SHARD_BYTES = 5 * 10**9


def hf_config(shape: str, layers: int | None) -> dict:
    c = dict(SHAPES[shape])
    c["num_hidden_layers"] = layers or c["num_hidden_layers"]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
            "head_dim": c["hidden_size"] // c["num_attention_heads"], "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", **c}


def hf_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v, d = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_synthetic(root: Path, c: dict) -> int:
    """Stream bf16 shards filled from one random 16 MB block (finite values); returns bytes of weights."""
    import torch

    from enginesmith.builders.convert.safetensors_stream import write_streaming

    block = (torch.randn(8 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    tensors, shards, cur, size = hf_tensors(c), [], [], 0
    for name, shape in tensors:
        n = 2 * int(torch.Size(shape).numel())
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)

    def chunks(entries):
        for _, shape in entries:
            left = int(torch.Size(shape).numel())
            while left:
                take = min(left, block.numel())
                yield block[:take]
                left -= take

    weight_map = {}
    for k, entries in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_streaming(root / fname, [(n, "bfloat16", s) for n, s in entries], chunks(entries), {"format": "pt"})
        weight_map |= {n: fname for n, _ in entries}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(c, indent=1))
    return sum((root / f).stat().st_size for f in set(weight_map.values()))


def time_cp(src: Path, dst: Path) -> tuple[float, float, float]:
    """Seconds for `cp` of every shard, for cp + fsync of the copies, and cp's CPU seconds."""
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.safetensors"))
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["cp", *map(str, files), str(dst)], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    t1 = time.perf_counter()
    for f in dst.iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    t2 = time.perf_counter()
    shutil.rmtree(dst)
    return t1 - t0, t2 - t0, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def child(src: str, out: str, layout: str, workers: int) -> None:
    """Run one conversion; print seconds, bytes written, CPU seconds and peak RSS as JSON."""
    import torch  # noqa: F401  (the converter imports it lazily; keep its import out of the CPU count)

    from enginesmith.builders.convert import convert_checkpoint
    from enginesmith.builders.mapping import Mapping
    from enginesmith.builders.model_spec import ModelSpec

    start = resource.getrusage(resource.RUSAGE_SELF)
    base, cpu0 = start.ru_maxrss * 1024, start.ru_utime + start.ru_stime
    t0 = time.perf_counter()
    m = convert_checkpoint(src, out, Mapping.create(**LAYOUTS[layout]), ModelSpec.from_pretrained_dir(src),
                           "bfloat16", workers=workers, progress=False)
    secs = time.perf_counter() - t0
    written = sum((Path(out) / f).stat().st_size for f in m.rank_files)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": secs, "bytes": written, "peak_rss": usage.ru_maxrss * 1024,
                      "rss_after_imports": base, "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu0}))


def run_layout(src: Path, work: Path, layout: str, workers: int) -> dict:
    out = work / f"ckpt-{layout}"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", str(src), str(out), layout, str(workers)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"convert {layout} failed:\n{proc.stderr.strip().splitlines()[-1]}")
    shutil.rmtree(out)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=None, help="trim the layer count to fit the disk")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/enginesmith-bench-convert"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved cp/convert rounds; medians are reported")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2], int(args.child[3]))

    cfg = hf_config(args.shape, args.layers)
    src = args.workdir / "hf"
    shutil.rmtree(args.workdir, ignore_errors=True)
    src.mkdir(parents=True)
    total = write_synthetic(src, cfg)
    largest = 2 * cfg["vocab_size"] * cfg["hidden_size"]
    cps, runs = [], {name: [] for name in LAYOUTS}
    try:
        for _ in range(args.repeat):  # interleaved, so a busy shared disk or CPU hits both alike
            cps.append(time_cp(src, args.workdir / "cp"))
            for name in LAYOUTS:
                runs[name].append(run_layout(src, args.workdir, name, args.workers))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    cp_s, cp_sync_s = statistics.median(c[0] for c in cps), statistics.median(c[1] for c in cps)
    cp_cpu = statistics.median(c[2] for c in cps)
    median = {name: {**sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2], "all_seconds": [r["seconds"] for r in rs],
                     "peak_rss": max(r["peak_rss"] for r in rs)} for name, rs in runs.items()}
    report(args, cfg, total, largest, (cp_s, cp_sync_s, cp_cpu), median, [c[1] for c in cps])


def report(args, cfg, total, largest, cp, runs, all_cp_sync) -> None:
    gb = 1e9
    cp_s, cp_sync_s, cp_cpu = cp
    cp_rate = total / cp_sync_s / gb
    rows, out = [], {}
    for name, r in runs.items():
        rate = r["bytes"] / r["seconds"] / gb
        budget = 1.5 * gb + largest
        out[name] = {**r, "gbps": rate, "ratio_vs_cp_fsync": rate / cp_rate,
                     "rss_budget": budget, "meets_speed": rate >= 0.8 * cp_rate, "meets_rss": r["peak_rss"] < budget}
        rows.append((name, f"{r['bytes'] / gb:.2f}", f"{r['seconds']:.1f}", f"{rate:.2f}", f"{rate / cp_rate:.2f}x",
                     f"{r['cpu_seconds'] / (r['bytes'] / gb):.2f}", f"{r['peak_rss'] / gb:.2f}", f"{budget / gb:.2f}"))
    print(f"shape {args.shape}, {cfg['num_hidden_layers']} layers, bf16, {total / gb:.2f} GB source; "
          f"largest tensor {largest / gb:.2f} GB; workers {args.workers}; cores {os.cpu_count()}")
    print(f"median of {args.repeat} interleaved rounds; peak RSS is the max over rounds")
    print(f"cp: {total / cp_s / gb:.2f} GB/s (page cache), cp+fsync: {cp_rate:.2f} GB/s "
          f"(rounds: {', '.join(f'{total / s / gb:.2f}' for s in all_cp_sync)}); "
          f"cp CPU {cp_cpu / (total / gb):.2f} s/GB; load average {os.getloadavg()[0]:.1f}")
    head = ("layout", "GB out", "s", "GB/s", "vs cp+fsync", "CPU s/GB", "peak RSS GB", "RSS budget GB")
    print("  ".join(f"{h:>13}" for h in head))
    for row in rows:
        print("  ".join(f"{c:>13}" for c in row))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "shape": args.shape, "layers": cfg["num_hidden_layers"], "dtype": "bfloat16", "source_bytes": total,
        "largest_tensor_bytes": largest, "workers": args.workers, "cpu_count": os.cpu_count(),
        "repeat": args.repeat, "cp_fsync_seconds_all": all_cp_sync, "load_average": os.getloadavg(),
        "cp_seconds": cp_s, "cp_fsync_seconds": cp_sync_s, "cp_cpu_seconds": cp_cpu,
        "cp_gbps": total / cp_s / gb, "cp_fsync_gbps": cp_rate,
        "runs": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
