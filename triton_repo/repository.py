"""Write the Triton model repository of a recipe: `write_repo(...) -> RepoManifest`.

Targets reference and trtllm-engine get upstream's `inflight_batcher_llm` set: ensemble, preprocessing,
tensorrt_llm, postprocessing and tensorrt_llm_bls. They differ only in tensorrt_llm's backend: `tensorrtllm`
over the engine directory, or `python` running our reference runtime (triton_repo/models/
tensorrt_llm_reference.py as tensorrt_llm/1/model.py). Target trtllm-llmapi gets upstream's single `llmapi`
model. Everything is checked first (triton_repo/repo_checks.py), written into a temporary directory, and
renamed into place, so a reader never sees a half-written repository.

The repository is self-contained: the `enginesmith.triton_repo` modules preprocessing, postprocessing and the
BLS import are copied next to each `model.py` (`<model>/1/enginesmith/triton_repo/...` under a plain
`<model>/1/enginesmith/__init__.py`, found by reading their imports), and the models put their own folder first
on `sys.path`, so a plain `tritonserver --model-repository` (or upstream's launch_triton_server.py) serves them
without enginesmith installed. The reference target's `tensorrt_llm`
model runs the reference runtime, so it needs enginesmith (and torch) installed where it is served.
"""

from __future__ import annotations

import ast
import shutil
import tempfile
from pathlib import Path

from pydantic import Field

from enginesmith.builders.manifest import StageManifest, sha256_file, sha256_json, tool_versions
from enginesmith.triton_repo import model_config as mc
from enginesmith.triton_repo import repo_checks as checks
from enginesmith.triton_repo.repo_checks import RepoError
from enginesmith.triton_repo.tensor_specs import TENSORRT_LLM_PARAMETERS

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT_PACKAGE = "enginesmith"
PACKAGES = ("builders", "runtime", "triton_repo", "client")
"""The import root's packages (`enginesmith.<name>`)."""
COPIED_ROOT_INIT = ('"""Import root of the enginesmith modules copied beside model.py by enginesmith\'s repository '
                    'writer."""\n')
"""The copy's `enginesmith/__init__.py`: a plain package (it does not extend `__path__` as the checkout's does)."""
MODELS_DIR = PACKAGE_DIR / "models"
SELF_CONTAINED = ("preprocessing", "postprocessing", "tensorrt_llm_bls")
"""Python models that must run with nothing of enginesmith installed (their helpers are copied beside them)."""
INFLIGHT_MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls")
EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
# Unset upstream parameters are written as "" (the C++ backend then logs and uses its default), except
# these: an empty lora_prefetch_dir would be taken as a directory to prefetch LoRA weights from.
OMITTED_WHEN_UNSET = ("lora_prefetch_dir",)

__all__ = ["RepoError", "RepoManifest", "write_repo", "tensorrt_llm_parameters"]


class RepoManifest(StageManifest):
    """`repo/manifest.json`: the models written, what they run, and from which engine and tokenizer."""

    stage: str = "repo"
    target: str = ""
    """Build target served: reference | trtllm-engine | trtllm-llmapi."""
    models: list[str] = Field(default_factory=list)
    tensorrt_llm_backend: str = ""
    """Backend of the tensorrt_llm model: tensorrtllm | python."""
    engine_dir: str = ""
    tokenizer_dir: str = ""
    triton_max_batch_size: int = 0
    decoupled: bool = False
    world_size: int = 1
    """tp_size * pp_size of the plan."""
    launch_ranks: int = 1
    """tritonserver processes under mpirun: world_size for trtllm-engine (leader mode), else 1 (the reference
    runtime and the LLM API start their own ranks)."""
    ranks: list[int] = Field(default_factory=list)
    """Engine ranks this node holds when each node has its own directory (`--ranks`); empty: all of them."""
    warnings: list[str] = Field(default_factory=list)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def tensorrt_llm_parameters(recipe, mapping, engine_dir: Path, tokenizer_dir: Path) -> dict[str, str]:
    """Every upstream `parameters` key of tensorrt_llm, filled from the recipe ("" where unset)."""
    b, s = recipe.build, recipe.serve
    known = {
        "max_beam_width": str(b.max_beam_width),
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "gpt_model_type": s.batching_strategy,
        "gpt_model_path": str(engine_dir),
        "batch_scheduler_policy": s.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": str(s.kv_cache_free_gpu_mem_fraction),
        "exclude_input_in_output": "true",  # text_output is the completion; a request may override it
        "enable_kv_cache_reuse": _flag(s.enable_kv_cache_reuse),  # the C++ default is true: always say it
        "enable_chunked_context": _flag(s.enable_chunked_context),
        "num_nodes": str(len({c.node for c in mapping.ranks()})),
        "executor_worker_path": EXECUTOR_WORKER,
        "tokenizer_dir": str(tokenizer_dir),
    }
    params = {k: known.get(k, "") for k in TENSORRT_LLM_PARAMETERS if k in known or k not in OMITTED_WHEN_UNSET}
    if b.target == "reference" and s.stream_interval != 1:  # the reference runtime's own key (not upstream's)
        params["stream_interval"] = str(s.stream_interval)
    return params


def reference_parameters(recipe) -> dict[str, str]:
    """The reference runtime's own tensorrt_llm parameters (backend python only)."""
    engine_process = recipe.serve.engine_process
    return {"engine_process": "" if engine_process is None else _flag(engine_process)}  # "": where there is a GPU


def model_parameters(engine_dir: Path, tokenizer_dir: Path) -> dict[str, dict[str, str]]:
    """Parameters of the three Python models we ship (upstream's keys)."""
    return {
        "preprocessing": {"tokenizer_dir": str(tokenizer_dir), "add_special_tokens": "true",
                          "multimodal_model_path": "", "gpt_model_path": str(engine_dir), "max_num_images": ""},
        "postprocessing": {"tokenizer_dir": str(tokenizer_dir), "skip_special_tokens": "true"},
        "tensorrt_llm_bls": {"accumulate_tokens": "false", "tensorrt_llm_model_name": "tensorrt_llm",
                             "tensorrt_llm_draft_model_name": "", "multimodal_encoders_name": ""},
    }


def repo_options(recipe) -> mc.RepoOptions:
    s = recipe.serve
    return mc.RepoOptions(
        triton_max_batch_size=s.triton_max_batch_size, decoupled=s.decoupled,
        tensorrt_llm_backend="python" if recipe.build.target == "reference" else "tensorrtllm",
        max_queue_delay_us=s.max_queue_delay_us, max_queue_size=s.max_queue_size,
        preprocessing_instances=s.preprocessing_instances, postprocessing_instances=s.postprocessing_instances,
        bls_instances=s.bls_instances or s.triton_max_batch_size)


def _module_file(name: str) -> Path | None:
    """Source file of `enginesmith.triton_repo[.x.y]`, or None when `name` is not one of this package's modules."""
    parts = name.split(".")
    if parts[:2] != [ROOT_PACKAGE, PACKAGE_DIR.name]:
        return None
    base = PACKAGE_DIR.joinpath(*parts[2:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(path: Path) -> set[str]:
    """Modules `path` imports (absolute imports; `from pkg import mod` also names `pkg.mod`)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def helper_files(model_file: Path) -> dict[str, Path | str]:
    """`enginesmith/...` path -> source of every module of this package `model_file` needs, transitively (with
    the `__init__.py` of each package on the way), or the text of the copy's own `enginesmith/__init__.py`."""
    found: dict[str, Path | str] = {f"{ROOT_PACKAGE}/__init__.py": COPIED_ROOT_INIT}
    todo = [model_file]
    while todo:
        for name in sorted(_imported(todo.pop())):
            parts = name.split(".")
            if parts[0] in PACKAGES:
                raise RepoError(f"{model_file.name} imports {name}: import it as {ROOT_PACKAGE}.{name}")
            if parts[0] == ROOT_PACKAGE and len(parts) > 1 and parts[1] != PACKAGE_DIR.name:
                raise RepoError(f"{model_file.name} needs {name}, which a self-contained repository cannot hold")
            for depth in range(2, len(parts) + 1):
                path = _module_file(".".join(parts[:depth]))
                rel = path and f"{ROOT_PACKAGE}/{PACKAGE_DIR.name}/{path.relative_to(PACKAGE_DIR).as_posix()}"
                if path is not None and rel not in found:
                    found[rel] = path
                    todo.append(path)
    return found


def _inflight_files(recipe, mapping, engine_dir: Path, tokenizer_dir: Path) -> dict[str, str | Path]:
    """Relative path -> config text, or the source file to copy."""
    o = repo_options(recipe)
    params = model_parameters(engine_dir, tokenizer_dir)
    core = tensorrt_llm_parameters(recipe, mapping, engine_dir, tokenizer_dir)
    if o.tensorrt_llm_backend == "python":
        core |= reference_parameters(recipe)
    configs = {
        "ensemble": mc.ensemble_config(o),
        "preprocessing": mc.preprocessing_config(o, params["preprocessing"]),
        "tensorrt_llm": mc.tensorrt_llm_config(o, core),
        "postprocessing": mc.postprocessing_config(o, params["postprocessing"]),
        "tensorrt_llm_bls": mc.bls_config(o, params["tensorrt_llm_bls"]),
    }
    files: dict[str, str | Path] = {f"{name}/config.pbtxt": mc.to_pbtxt(cfg) for name, cfg in configs.items()}
    for name in SELF_CONTAINED:
        files[f"{name}/1/model.py"] = MODELS_DIR / f"{name}.py"
        files.update({f"{name}/1/{rel}": src for rel, src in helper_files(MODELS_DIR / f"{name}.py").items()})
    if o.tensorrt_llm_backend == "python":
        files["tensorrt_llm/1/model.py"] = MODELS_DIR / "tensorrt_llm_reference.py"
    return files


def _llmapi_files(recipe, engine_dir: Path, llmapi_model_py: Path | None) -> dict[str, str | Path]:
    o = repo_options(recipe)
    files: dict[str, str | Path] = {"tensorrt_llm/config.pbtxt": mc.to_pbtxt(mc.llmapi_config(o)),
                                    "tensorrt_llm/1/model.yaml": engine_dir / "model.yaml"}
    if llmapi_model_py is not None:
        if not Path(llmapi_model_py).is_file():
            raise RepoError(f"--llmapi-model-py {llmapi_model_py} is not a file: give the path of TensorRT-LLM's "
                            "triton_backend/all_models/llmapi/tensorrt_llm/1/model.py")
        files["tensorrt_llm/1/model.py"] = Path(llmapi_model_py)
    return files


def _warnings(recipe, files) -> list[str]:
    s, out = recipe.serve, []
    if s.decoupled and s.postprocessing_instances > 1 and recipe.build.target != "trtllm-llmapi":
        out.append(f"serve.postprocessing_instances={s.postprocessing_instances}: the ensemble detokenizes a "
                   "stream incrementally per request id inside one postprocessing process; with several "
                   "instances a character split across two responses may come out as U+FFFD. Use 1, or "
                   "stream through tensorrt_llm_bls (exact with any instance count).")
    if s.stream_interval != 1 and recipe.build.target != "reference":
        out.append(f"serve.stream_interval={s.stream_interval} applies to the reference runtime only: the "
                   f"{recipe.build.target} model streams every token.")
    if recipe.build.target == "trtllm-llmapi" and "tensorrt_llm/1/model.py" not in files:
        out.append("tensorrt_llm/1/model.py is not written: copy TensorRT-LLM's triton_backend/all_models/"
                   "llmapi/tensorrt_llm/1/model.py there (or pass --llmapi-model-py) before serving.")
    return out


def launch_ranks(target: str, mapping) -> int:
    """MPI ranks of the launch: leader mode runs one tritonserver per engine rank."""
    return mapping.world_size if target == "trtllm-engine" else 1


def _streaming_because(recipe, streaming: bool | None) -> str | None:
    if streaming is False:
        return None
    if streaming:
        return "a streaming repository was asked for"
    needs = [f"sla.{n}" for n in ("ttft_ms", "tpot_ms") if getattr(recipe.sla, n) is not None]
    return f"{' and '.join(needs)} {'is' if len(needs) == 1 else 'are'} measured on a token stream" if needs else None


def _tree_hash(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


def check_inputs(recipe, plan, engine_dir: Path, tokenizer_dir: Path, streaming: bool | None = None,
                 gpu_compute_capability: str | None = None, trtllm_version: str | None = None,
                 ranks: tuple[int, ...] | None = None):
    """Every cross-check of `write_repo`; returns the engine facts (raises RepoError)."""
    from enginesmith.builders.build.gpu import gpu_arch_of

    target = recipe.build.target
    if ranks is not None and target != "trtllm-engine":
        raise RepoError(f"--ranks applies to build.target trtllm-engine only, not {target}: its ranks start "
                        "from one server")
    facts = checks.read_engine_facts(engine_dir, target)
    checks.check_tokenizer(tokenizer_dir)
    checks.check_serve_options(recipe.serve, facts, _streaming_because(recipe, streaming))
    checks.check_layout(plan.mapping, facts, ranks)
    if target == "trtllm-engine":
        checks.check_engine_target(engine_dir, target, gpu_compute_capability or
                                   gpu_arch_of(recipe.hardware).compute_capability,
                                   trtllm_version or checks.serving_trtllm_version())
    else:
        checks.check_engine_target(engine_dir, target, None, None)
    return facts


def _manifest(recipe, plan, files, engine_dir: Path, tokenizer_dir: Path, engine_file: Path,
              ranks: tuple[int, ...] | None = None) -> RepoManifest:
    target = recipe.build.target
    m = RepoManifest(ranks=list(ranks or ()),
        target=target, models=sorted({rel.split("/")[0] for rel in files}),
        tensorrt_llm_backend="python" if target == "trtllm-llmapi" else repo_options(recipe).tensorrt_llm_backend,
        engine_dir=str(engine_dir), tokenizer_dir=str(tokenizer_dir),
        triton_max_batch_size=recipe.serve.triton_max_batch_size, decoupled=recipe.serve.decoupled,
        world_size=plan.mapping.world_size, launch_ranks=launch_ranks(target, plan.mapping),
        warnings=_warnings(recipe, files), versions=tool_versions(),
        inputs={"engine": sha256_file(engine_file), "tokenizer": sha256_json(_tree_hash(tokenizer_dir))})
    m.key = sha256_json({"inputs": m.inputs, "ranks": m.ranks, "files": {
        rel: src if isinstance(src, str) else sha256_file(src) for rel, src in sorted(files.items())}})
    return m


def write_repo(recipe, plan, engine_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *,
               streaming: bool | None = None, llmapi_model_py: str | Path | None = None,
               gpu_compute_capability: str | None = None, trtllm_version: str | None = None,
               ranks: tuple[int, ...] | None = None) -> RepoManifest:
    """Check, then write the repository of `recipe` into `out_dir` (replaced atomically; skipped if unchanged).

    `streaming`: None derives it from the SLA (TTFT / TPOT targets are measured on a token stream).
    `gpu_compute_capability` / `trtllm_version` (trtllm-engine): the serving side; default the recipe's
    GPU and the installed TensorRT-LLM. `ranks` (trtllm-engine): the engine ranks this node holds when each
    node has its own directory; only those engines must be here.
    """
    engine_dir, tokenizer_dir, out_dir = Path(engine_dir).resolve(), Path(tokenizer_dir).resolve(), Path(out_dir)
    facts = check_inputs(recipe, plan, engine_dir, tokenizer_dir, streaming, gpu_compute_capability, trtllm_version,
                         ranks)
    if recipe.build.target == "trtllm-llmapi":
        files = _llmapi_files(recipe, engine_dir, Path(llmapi_model_py) if llmapi_model_py else None)
    else:
        files = _inflight_files(recipe, plan.mapping, engine_dir, tokenizer_dir)
    manifest = _manifest(recipe, plan, files, engine_dir, tokenizer_dir, facts.source, ranks)
    old = RepoManifest.read(out_dir) if (out_dir / "manifest.json").is_file() else None
    if old is not None and old.is_complete(out_dir, manifest.key):
        return old
    _write_atomically(out_dir, files, manifest)
    return manifest


def _write_atomically(out_dir: Path, files: dict[str, str | Path], manifest: RepoManifest) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        for rel, src in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, str):
                path.write_text(src)
            else:
                shutil.copyfile(src, path)
            manifest.outputs[rel] = sha256_file(path)
        for model in manifest.models:  # every model needs its version directory, even when empty
            (tmp / model / "1").mkdir(parents=True, exist_ok=True)
        manifest.write(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
