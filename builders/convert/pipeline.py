"""`convert_checkpoint`: HF safetensors -> TensorRT-LLM unified checkpoint, streamed, ranks in parallel.

Order of work: validate everything (nothing written on failure) -> reuse rank files that match the
previous run -> write the missing ranks (temp name + rename, one thread per rank) -> config.json,
tokenizer/ -> manifest.json last. Completed ranks are recorded in `.convert-progress.json` as they finish,
so a killed run resumes with the ranks it had not finished.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from enginesmith.builders.convert import validate
from enginesmith.builders.convert.config import trtllm_config
from enginesmith.builders.convert.errors import ConvertError
from enginesmith.builders.convert.manifest import CheckpointManifest, convert_key, read_json, source_fingerprint
from enginesmith.builders.convert.progress import ByteProgress
from enginesmith.builders.convert.quantize import ALGOS, RECIPE_ALGOS
from enginesmith.builders.convert.rank_plan import plan_rank
from enginesmith.builders.convert.memory_gate import MemoryGate
from enginesmith.builders.convert.rank_writer import max_cost, write_rank
from enginesmith.builders.convert.source import HFSource, weight_files
from enginesmith.builders.convert.tokenizer import copy_tokenizer, tokenizer_digests
from enginesmith.builders.manifest import atomic_write_text, sha256_bytes, sha256_file, sha256_json, tool_versions
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec

PROGRESS_NAME = ".convert-progress.json"
MIN_GATE_BYTES = 256 << 20
"""Floor of the shared in-flight memory budget; the budget is the largest piece when that is bigger."""


def resolve_quant_algo(quantization: str | None) -> str | None:
    """Recipe name (none / int8_weight_only / int4_weight_only) or TensorRT-LLM name -> quant_algo."""
    if quantization in ALGOS:
        return quantization
    if quantization is None or quantization in RECIPE_ALGOS:
        return RECIPE_ALGOS.get(quantization or "none")
    raise ConvertError(f"quantization.weights={quantization!r} is not supported by convert; choose one of "
                       f"{', '.join(RECIPE_ALGOS)} (fp8 needs calibrated scales from NVIDIA ModelOpt)")


def rank_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


def _reusable(out: Path, key: str, world_size: int) -> dict[str, str]:
    """Rank files from an earlier run with the same key whose content still matches its recorded sha256."""
    recorded: dict[str, str] = {}
    for meta in (read_json(out / PROGRESS_NAME), read_json(out / "manifest.json")):
        if meta and meta.get("key") == key:
            recorded |= {k: v for k, v in meta.get("outputs", {}).items() if k.startswith("rank")}
    names = {rank_name(r) for r in range(world_size)}
    return {rel: sha for rel, sha in recorded.items()
            if rel in names and (out / rel).is_file() and sha256_file(out / rel) == sha}


def _clean(out: Path, world_size: int, key: str) -> None:
    """Remove temp files of killed runs, rank files beyond this mapping's world size, and a manifest of a
    different conversion (its files are about to be replaced, so it must not vouch for the folder)."""
    old = read_json(out / "manifest.json")
    if old is not None and old.get("key") != key:
        (out / "manifest.json").unlink()
    for p in out.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    for p in out.glob("rank*.safetensors"):
        if p.name not in {rank_name(r) for r in range(world_size)}:
            p.unlink()


def _write_ranks(hf_dir: Path, out: Path, files: dict, todo: list[int], plans_of, key: str, done: dict,
                 workers: int, progress: bool) -> dict[str, str]:
    """Write the ranks in `todo` with a thread pool; records each finished rank in the progress file."""
    lock, cancel = threading.Lock(), threading.Event()
    plans = {r: plans_of(r) for r in todo}
    total = sum(_plan_bytes(plans[r]) for r in todo)
    with HFSource(hf_dir, files) as src:
        gate = MemoryGate(max([MIN_GATE_BYTES] + [max_cost(plans[r], src) for r in todo]))
    with ByteProgress(total, f"convert {len(todo)} rank(s)", enabled=progress) as bar:
        def on_bytes(n: int) -> None:
            if cancel.is_set():
                raise ConvertError("conversion cancelled")
            bar.advance(n)

        def one(rank: int) -> tuple[str, str]:
            with HFSource(hf_dir, files) as src:
                sha = write_rank(out / rank_name(rank), plans[rank], src, {"format": "pt", "rank": str(rank)},
                                 on_bytes, gate)
            with lock:
                done[rank_name(rank)] = sha
                atomic_write_text(out / PROGRESS_NAME, json.dumps({"key": key, "outputs": done}, indent=1))
            return rank_name(rank), sha

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, single_threaded_torch():
            futures = [pool.submit(one, r) for r in todo]
            try:
                for f in as_completed(futures):
                    f.result()
            except BaseException:
                cancel.set()
                raise
    return done


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Block copies are memory-bound and ranks already run in parallel: torch's OpenMP pool would only spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _plan_bytes(plans) -> int:
    from enginesmith.builders.convert.safetensors_stream import entry_nbytes

    return sum(entry_nbytes(e) for p in plans for e in p.entries())


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What one `convert` call did."""

    manifest: CheckpointManifest
    written: list[str]
    """Rank files this call wrote; the others were reused from an earlier run with the same key."""
    up_to_date: bool
    """Nothing was written: the folder already held this very conversion (manifest, config, tokenizer)."""


def convert_checkpoint(*args, **kwargs) -> CheckpointManifest:
    """`convert`'s manifest (same arguments)."""
    return convert(*args, **kwargs).manifest


def convert(hf_dir: str | Path, out_dir: str | Path, mapping: Mapping, spec: ModelSpec,
            dtype: str = "bfloat16", quantization: str | None = None, *, workers: int = 1,
            progress: bool = True, source_id: str | None = None, source_revision: str | None = None,
            prequantize: bool = True, plan: dict | None = None,
            ranks: tuple[int, ...] | None = None) -> ConvertResult:
    """Convert `hf_dir` into `out_dir` (config.json, rank{N}.safetensors, tokenizer/, manifest.json).

    `ranks` (default all): the rank files to write, e.g. one node's of a multi-node layout without a shared
    filesystem; the manifest then lists only those.

    With weight-only `quantization`, `prequantize=True` stores int8 weights + per_channel_scale (the
    reference runtime's input); False keeps float weights and only sets `quant_algo`, so `trtllm-build`
    quantizes them itself with the GPU-specific preprocessing (see quantize.py). `plan` (Plan.to_dict()) is
    recorded in the manifest; only the mapping, dtype, quantization and source decide the cache key. A folder
    that already holds this conversion, intact, is left untouched.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    quant_algo = resolve_quant_algo(quantization)
    validate.check_options(dtype, quant_algo, spec)
    validate.check_layout(spec, mapping)
    files = weight_files(hf_dir)
    with HFSource(hf_dir, files) as src:
        validate.check_source(src, spec)
    hf_config = read_json(hf_dir / "config.json")
    mapping_dict = mapping.to_trtllm_dict()
    stored_algo = quant_algo if prequantize else None
    key = convert_key(source_fingerprint(hf_dir, list(files.values())), mapping_dict, dtype,
                      f"{quant_algo}:{'int' if stored_algo else 'float'}", source_revision)
    config_text = json.dumps(trtllm_config(spec, mapping, dtype, quant_algo, hf_config), indent=2) + "\n"
    wanted = list(range(mapping.world_size)) if ranks is None else sorted(ranks)
    names = [rank_name(r) for r in wanted]

    def manifest_with(outputs: dict[str, str]) -> CheckpointManifest:
        return CheckpointManifest(
            key=key, inputs={"source": key_source(source_id, source_revision, hf_dir),
                             **({"plan": sha256_json(plan)} if plan else {})}, plan=plan or {},
            versions=tool_versions("safetensors", "torch", "transformers", "huggingface-hub"),
            outputs=outputs, source={"path": str(hf_dir.resolve()), "repo_id": source_id,
                                     "revision": source_revision},
            mapping=mapping_dict, dtype=dtype, quant_algo=quant_algo, prequantized=stored_algo is not None,
            rank_files=names)

    if (previous := _previous(out, key)) is not None:
        expected = manifest_with({"config.json": sha256_bytes(config_text.encode()),
                                  **{r: previous.outputs.get(r, "") for r in names}, **tokenizer_digests(hf_dir)})
        same = expected.model_dump(exclude={"created"}) == previous.model_dump(exclude={"created"})
        if same and not previous.mismatched_outputs(out):
            return ConvertResult(previous, written=[], up_to_date=True)

    out.mkdir(parents=True, exist_ok=True)
    _clean(out, mapping.world_size, key)
    done = _reusable(out, key, mapping.world_size)
    todo = [r for r in wanted if rank_name(r) not in done]
    _write_ranks(hf_dir, out, files, todo, lambda r: plan_rank(spec, mapping, r, dtype, stored_algo), key,
                 done, workers, progress)

    atomic_write_text(out / "config.json", config_text)
    outputs = {"config.json": sha256_file(out / "config.json")}
    outputs |= {r: done[r] for r in names}
    outputs |= copy_tokenizer(hf_dir, out)
    manifest = manifest_with(outputs)
    manifest.write(out)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    return ConvertResult(manifest, written=[rank_name(r) for r in todo], up_to_date=False)


def _previous(out: Path, key: str) -> CheckpointManifest | None:
    """The folder's manifest when it records the same conversion key."""
    old = read_json(out / "manifest.json")
    if old is None or old.get("key") != key:
        return None
    try:
        return CheckpointManifest.model_validate(old)
    except ValueError:
        return None


def key_source(source_id: str | None, revision: str | None, hf_dir: Path) -> str:
    return f"{source_id}@{revision}" if source_id and revision else str(hf_dir.resolve())
