"""The reference runtime on one GPU, next to its hardware limits and to transformers (issue 6).

    python -m benchmarks.runtime                                  # hw, decode, serving, moe (< 6 min on an H100)
    python -m benchmarks.runtime --device cuda --tiny             # seconds-long smoke test of every code path
    python -m benchmarks.runtime --device cpu --tiny --out /tmp/r.json
    python -m benchmarks.runtime --sections tp,pp                 # on a 2-GPU machine (one process per rank)

Run it as a module from the repository root (it imports its sibling modules as `benchmarks.*`). Sections:
hw (copy GB/s counting read + write, bf16 matmul TFLOP/s); decode (batch-1 greedy decode of a random
Llama-3-8B in bf16: fast path, plain path, % of the HBM roofline, target >= 80%); serving (256 mixed-length
requests through the in-flight batching engine vs transformers static-batch `generate` and its continuous
batching, target >= 5x static); moe (batch-1 decode of a Mixtral-shaped MoE trimmed to --moe-layers); tp
(tp=2 vs tp=1 decode); pp (pipeline bubble vs micro-batch count).
Results go to benchmarks/results/runtime-<card>.json, rewritten after every section.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("hw", "decode", "serving", "moe", "tp", "pp")
DEFAULT_SECTIONS = ("hw", "decode", "serving", "moe")


def main(argv: list[str] | None = None) -> int:
    if not __package__:
        sys.exit("run this as a module from the repository root: python -m benchmarks.runtime ...")
    args = _parser().parse_args(argv)
    import torch

    from benchmarks.runtime_hw import card_slug

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        sys.exit(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    name = f"runtime-{card_slug(card)}{'-tiny' if args.tiny else ''}.json"
    out = Path(args.out) if args.out else RESULTS / name
    out = out / name if out.is_dir() else out
    results = dict(card=card, device=str(device), tiny=args.tiny, sections=sections, versions=_versions(),
                   started=datetime.now(timezone.utc).isoformat(timespec="seconds"), errors={})
    bench = Bench(args, device, results, out)
    for name in sections:
        bench.section(name)
    bench.progress(f"done; results in {out}")
    print(table(results))
    return 1 if results["errors"] else 0


class Bench:
    """Runs sections in order; a failing section is recorded and the next one still runs."""

    def __init__(self, args, device, results: dict, out: Path):
        self.args, self.device, self.results, self.out = args, device, results, out
        self.t0 = time.perf_counter()

    def progress(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def write(self) -> None:
        write_atomic(self.out, json.dumps(self.results, indent=2, default=str))

    def section(self, name: str) -> None:
        from benchmarks import runtime_sections

        self.progress(f"section {name}")
        start = time.perf_counter()
        try:
            getattr(runtime_sections, name)(self)
        except Exception as e:
            self.results["errors"][name] = "".join(traceback.format_exception(e))[-4000:]
            self.progress(f"section {name} FAILED: {type(e).__name__}: {e}")
        finally:
            self.results.setdefault(name, {})
            if isinstance(self.results[name], dict):
                self.results[name]["section_s"] = round(time.perf_counter() - start, 1)
            self.write()
            _free()

    def partial(self, name: str, data: dict) -> None:
        self.results[name] = data
        self.write()

    def copy_gbps(self) -> float:
        """The measured copy bandwidth (measured now if the hw section did not run)."""
        if "copy_gbps" not in self.results.get("hw", {}):
            from benchmarks import runtime_hw

            self.results.setdefault("hw", {}).update(runtime_hw.copy_bandwidth(
                self.device, (16 << 20) if self.args.tiny else (2 << 30)))
        return self.results["hw"]["copy_gbps"]

    def decoder_options(self) -> dict:
        a = self.args
        opts = dict(attention=a.attention)
        if a.no_compile:
            opts["compile"] = False
        if a.no_graphs:
            opts["cuda_graphs"] = False
        if a.no_gemv:
            opts["gemv"] = False
        return opts


def table(r: dict) -> str:
    """The short summary printed last."""
    from benchmarks.runtime_parallel import pp_runs

    rows = [("section", "metric", "value", "target")]
    hw, srv = r.get("hw", {}), r.get("serving", {})
    _row(rows, "hw", "copy GB/s (read+write)", hw.get("copy_gbps"))
    _row(rows, "hw", f"{hw.get('matmul_dtype', '')} matmul TFLOP/s", hw.get("matmul_tflops"))
    _decode_rows(rows, "decode", r.get("decode", {}))
    for key, label in (("engine", "engine"), ("hf_static", "HF static generate"), ("hf_continuous", "HF continuous")):
        v = srv.get(key, {})
        _row(rows, "serving", f"{label} tok/s", v.get("tok_s", v.get("error", "")[:40] or None))
    _row(rows, "serving", "speedup vs static", srv.get("speedup_vs_static"), ">= 5")
    _decode_rows(rows, "moe", r.get("moe", {}))
    for name in ("tp", "pp"):
        for k, v in (r.get(name) or {}).items():
            if isinstance(v, int | float) and k != "section_s":
                _row(rows, name, k, v)
    pp = r.get("pp") or {}
    for name, run in (pp_runs(pp) if pp else {}).items():
        if run.get("stage_s"):
            _row(rows, "pp", f"{name} layers: stage ms, whole step", 1e3 * max(run["stage_s"]))
        for m, v in (run.get("measured_bubble") or {}).items():
            predicted = f"{pp['predicted_bubble'][m]:.3f} predicted"
            _row(rows, "pp", f"{name} layers: bubble, {m} micro-batches", v, predicted)
    for name, err in r.get("errors", {}).items():
        rows.append((name, "ERROR", err.strip().splitlines()[-1][:60], ""))
    widths = [max(len(str(x[i])) for x in rows) for i in range(4)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def _decode_rows(rows: list, name: str, d: dict) -> None:
    f, p = d.get("fast", {}), d.get("plain", {})
    _row(rows, name, "roofline tok/s", d.get("roofline_tok_s"))
    _row(rows, name, "fast tok/s", f.get("tok_s"))
    _row(rows, name, "fast % of roofline", f.get("pct_roofline"), ">= 80" if name == "decode" else "")
    _row(rows, name, "fast % of roofline, token fed on the GPU", f.get("device_fed", {}).get("pct_roofline"))
    _row(rows, name, "plain tok/s", p.get("tok_s"))
    _row(rows, name, "fast vs plain max rel err", d.get("fast_vs_plain", {}).get("max_rel_err"))
    for key, b in (d.get("baselines") or {}).items():
        _row(rows, name, f"baseline {key} tok/s", b.get("tok_s"))
        _row(rows, name, f"baseline {key} % of roofline", b.get("pct_roofline"))


def _row(rows: list, section: str, metric: str, value, target: str = "") -> None:
    if value is None:
        return
    rows.append((section, metric, f"{value:.4g}" if isinstance(value, float) else str(value), target))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", help="cuda (default if present) | cpu | cuda:N")
    ap.add_argument("--tiny", action="store_true", help="toy shapes: a smoke test of every code path")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--out", help="results JSON, or a folder for runtime-<card>.json (default benchmarks/results/)")
    ap.add_argument("--attention", default="auto", choices=("auto", "triton", "gather"), help="decode attention")
    ap.add_argument("--no-compile", action="store_true", help="fast path without torch.compile")
    ap.add_argument("--no-graphs", action="store_true", help="fast path without CUDA graphs")
    ap.add_argument("--no-gemv", action="store_true",
                    help="batch-1 steps through the cuBLAS regions, not the fused GEMV kernels")
    ap.add_argument("--moe-layers", type=int, default=8, help="layers of the Mixtral-shaped model (full: 32)")
    ap.add_argument("--tp-shape", default="llama-3-8b", choices=("llama-3-8b", "llama-3-70b", "mixtral-8x7b"),
                    help="model shape of the tp section")
    ap.add_argument("--tp-layers", type=int, help="trim the tp section's model to this many layers (70b: 40 fit "
                                                  "one H200 for the tp=1 run; mixtral-8x7b: 8 unless given)")
    ap.add_argument("--requests", type=int, help="serving requests (default 256; tiny 12)")
    ap.add_argument("--max-batch-size", type=int, help="serving batch limit, also the static batch (default 64)")
    ap.add_argument("--hf-budget-s", type=float, default=40.0,
                    help="each transformers baseline starts no new work after this many seconds")
    return ap


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_atomic(path: Path, text: str) -> None:
    """Temporary file in the same folder, then rename (builders.manifest needs pydantic, absent on GPU hosts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
