"""write_repo: the files of each target, the cross-checks (each a clear error), atomic replacement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from enginesmith.builders.build.cache import EngineManifest
from enginesmith.builders.planner.plan import make_plan
from enginesmith.builders.recipe import parse_recipe
from enginesmith.builders.tiny_model import make_tokenizer
from enginesmith.triton_repo import repo_checks
from enginesmith.triton_repo.model_config import parse_pbtxt
from enginesmith.triton_repo.repository import RepoError, RepoManifest, write_repo

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-llama.yaml"
INFLIGHT = ["ensemble", "postprocessing", "preprocessing", "tensorrt_llm", "tensorrt_llm_bls"]


def recipe(hardware: dict | None = None, **sections):
    """tiny-llama.yaml with some sections updated (`hardware` replaces that section)."""
    data = yaml.safe_load(RECIPE.read_text())
    data["model"]["source"] = "/nonexistent/tiny-llama-hf"  # the shipped spec plans it without files
    if hardware is not None:
        data["hardware"] = hardware
    for name, values in sections.items():
        data[name] = {**data[name], **values} if isinstance(data.get(name), dict) else values
    return parse_recipe(data)


def engine_recipe(gpu: str = "H100", **sections):
    build = {"target": "trtllm-engine", **sections.pop("build", {})}
    return recipe(hardware={"gpu": gpu}, build=build, **sections)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


def reference_engine(d: Path, **limits) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(target="reference", checkpoint_dir="/ckpt", max_batch_size=16, max_input_len=256, max_seq_len=512,
               max_num_tokens=1024, max_beam_width=1, tokens_per_block=16, dtype="float32") | limits
    (d / "engine_config.json").write_text(json.dumps(cfg))
    return d


def trtllm_engine(d: Path, tp=1, pp=1, max_batch_size=16, paged_context_fmha=True, ranks=None,
                  manifest: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"version": "1.2.1", "pretrained_config": {"mapping": {"world_size": tp * pp, "tp_size": tp,
                                                                 "pp_size": pp}},
           "build_config": {"max_batch_size": max_batch_size, "max_beam_width": 1,
                            "plugin_config": {"use_paged_context_fmha": paged_context_fmha}}}
    (d / "config.json").write_text(json.dumps(cfg))
    for r in range(tp * pp if ranks is None else ranks):
        (d / f"rank{r}.engine").write_bytes(b"not a real engine")
    if manifest is not None:
        EngineManifest(target="trtllm-engine", **manifest).write(d)
    return d


def write(r, engine_dir, tokenizer_dir, out, **kw) -> RepoManifest:
    return write_repo(r, make_plan(r, with_options=False), engine_dir, tokenizer_dir, out, **kw)


def config(out: Path, model: str):
    return parse_pbtxt((out / model / "config.pbtxt").read_text())


def test_reference_repository(tmp_path, tokenizer_dir):
    out = tmp_path / "repo"
    m = write(recipe(), reference_engine(tmp_path / "engine"), tokenizer_dir, out)
    assert m.models == INFLIGHT and m.target == "reference" and m.tensorrt_llm_backend == "python"
    assert m.launch_ranks == 1
    assert RepoManifest.read(out).key == m.key and not m.mismatched_outputs(out)
    for model in INFLIGHT:
        assert (out / model / "1").is_dir()
        assert config(out, model).name == model
    trt = config(out, "tensorrt_llm")
    assert trt.backend == "python" and trt.model_transaction_policy.decoupled
    assert trt.parameters["gpt_model_path"].string_value == str((tmp_path / "engine").resolve())
    assert trt.parameters["tokenizer_dir"].string_value == str(tokenizer_dir.resolve())
    models = Path(__file__).resolve().parents[1] / "triton_repo" / "models"
    assert (out / "tensorrt_llm/1/model.py").read_bytes() == (models / "tensorrt_llm_reference.py").read_bytes()
    for name in ("preprocessing", "postprocessing", "tensorrt_llm_bls"):
        assert (out / name / "1/model.py").read_bytes() == (models / f"{name}.py").read_bytes()
    assert all(config(out, m).max_batch_size == 16 for m in INFLIGHT)
    assert "${" not in "".join((out / m / "config.pbtxt").read_text() for m in INFLIGHT)


def test_targets_differ_only_in_tensorrt_llm_backend(tmp_path, tokenizer_dir):
    engine = reference_engine(tmp_path / "engine")
    trtllm_engine(engine)  # both targets' files in one directory, so every path parameter is equal
    ref, eng = tmp_path / "ref", tmp_path / "eng"
    write(recipe(), engine, tokenizer_dir, ref)
    m = write(engine_recipe(), engine, tokenizer_dir, eng, trtllm_version="1.2.1")
    assert m.tensorrt_llm_backend == "tensorrtllm" and not (eng / "tensorrt_llm/1/model.py").exists()
    for model in INFLIGHT:
        a, b = config(ref, model), config(eng, model)
        if model == "tensorrt_llm":
            assert (a.backend, b.backend) == ("python", "tensorrtllm")
            b.backend = "python"
            assert a.parameters["engine_process"].string_value == ""  # the reference runtime's own key (auto)
            del a.parameters["engine_process"]
        assert a == b, model


@pytest.mark.parametrize("engine_process,value", [(True, "true"), (False, "false"), (None, "")])
def test_engine_process_recipe_field_becomes_the_reference_parameter(tmp_path, tokenizer_dir, engine_process, value):
    serve = {} if engine_process is None else {"engine_process": engine_process}
    write(recipe(serve=serve), reference_engine(tmp_path / "engine"), tokenizer_dir, tmp_path / "repo")
    trt = config(tmp_path / "repo", "tensorrt_llm")
    assert trt.parameters["engine_process"].string_value == value


def test_rewrite_is_skipped_when_nothing_changed_and_replaced_otherwise(tmp_path, tokenizer_dir):
    engine, out = reference_engine(tmp_path / "engine"), tmp_path / "repo"
    first = write(recipe(), engine, tokenizer_dir, out)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert write(recipe(), engine, tokenizer_dir, out).key == first.key
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    (out / "stray.txt").write_text("left by hand")
    changed = write(recipe(serve={"triton_max_batch_size": 4}), engine, tokenizer_dir, out)
    assert changed.key != first.key and not (out / "stray.txt").exists()
    assert config(out, "ensemble").max_batch_size == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_write_leaves_the_old_repository(tmp_path, tokenizer_dir, monkeypatch):
    engine, out = reference_engine(tmp_path / "engine"), tmp_path / "repo"
    old = write(recipe(), engine, tokenizer_dir, out)

    def broken_copy(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("enginesmith.triton_repo.repository.shutil.copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        write(recipe(serve={"triton_max_batch_size": 8}), engine, tokenizer_dir, out)
    assert RepoManifest.read(out).key == old.key and not old.mismatched_outputs(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_triton_batch_larger_than_engine_batch(tmp_path, tokenizer_dir):
    with pytest.raises(RepoError, match=r"serve.triton_max_batch_size=16 exceeds the engine's max_batch_size=8"):
        write(recipe(), reference_engine(tmp_path / "engine", max_batch_size=8), tokenizer_dir, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_streaming_needs_decoupled(tmp_path, tokenizer_dir):
    engine = reference_engine(tmp_path / "engine")
    with pytest.raises(RepoError, match=r"sla.ttft_ms and sla.tpot_ms are measured on a token stream: "
                                        r"streaming needs serve.decoupled: true"):
        write(recipe(serve={"decoupled": False}), engine, tokenizer_dir, tmp_path / "repo")
    m = write(recipe(serve={"decoupled": False}, sla={"ttft_ms": None, "tpot_ms": None, "e2e_ms": 9000}),
              engine, tokenizer_dir, tmp_path / "repo")
    assert not m.decoupled and not config(tmp_path / "repo", "tensorrt_llm_bls").model_transaction_policy.decoupled
    with pytest.raises(RepoError, match="a streaming repository was asked for: streaming needs"):
        write(recipe(serve={"decoupled": False}), engine, tokenizer_dir, tmp_path / "repo2", streaming=True)


@pytest.mark.parametrize("field", ["enable_chunked_context", "enable_kv_cache_reuse"])
def test_chunked_context_and_reuse_need_paged_context_fmha(tmp_path, tokenizer_dir, field):
    engine = trtllm_engine(tmp_path / "engine", paged_context_fmha=False)
    with pytest.raises(RepoError, match=rf"serve.{field}: true needs an engine built with use_paged_context_fmha"):
        write(engine_recipe(serve={field: True}), engine, tokenizer_dir, tmp_path / "repo", trtllm_version="1.2.1")
    trtllm_engine(engine, paged_context_fmha=True)
    m = write(engine_recipe(serve={field: True}), engine, tokenizer_dir, tmp_path / "repo", trtllm_version="1.2.1")
    assert config(tmp_path / "repo", "tensorrt_llm").parameters[field].string_value == "true" and m.models


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_kv_cache_fraction_range(fraction):
    serve = SimpleNamespace(kv_cache_free_gpu_mem_fraction=fraction, triton_max_batch_size=1, decoupled=True,
                            enable_chunked_context=False, enable_kv_cache_reuse=False)
    engine = repo_checks.EngineFacts("reference", 8, 1, True, None, None, None, Path("e"))
    with pytest.raises(RepoError, match=rf"kv_cache_free_gpu_mem_fraction={fraction} must be in \(0, 1\]"):
        repo_checks.check_serve_options(serve, engine, None)


def test_engine_layout_must_match_the_plan(tmp_path, tokenizer_dir):
    r = engine_recipe(parallel={"tp_size": 2, "pp_size": 1})
    with pytest.raises(RepoError, match="tp_size=1 but the plan has tp_size=2"):
        write(r, trtllm_engine(tmp_path / "e1", tp=1), tokenizer_dir, tmp_path / "repo", trtllm_version="1.2.1")
    with pytest.raises(RepoError, match="holds 1 rank\\*.engine files but the plan has world_size=2"):
        write(r, trtllm_engine(tmp_path / "e2", tp=2, ranks=1), tokenizer_dir, tmp_path / "repo",
              trtllm_version="1.2.1")
    m = write(r, trtllm_engine(tmp_path / "e3", tp=2), tokenizer_dir, tmp_path / "repo", trtllm_version="1.2.1")
    assert m.world_size == 2 and m.launch_ranks == 2  # leader mode: one tritonserver per engine rank


def test_world_size_must_be_tp_times_pp():
    mapping = SimpleNamespace(world_size=3, tp_size=2, pp_size=1)
    engine = repo_checks.EngineFacts("trtllm-engine", 8, 1, True, 2, 1, 3, Path("e/config.json"))
    with pytest.raises(RepoError, match=r"world_size=3 must equal tp_size\*pp_size=2"):
        repo_checks.check_layout(mapping, engine)


def test_engine_built_for_another_gpu_or_version(tmp_path, tokenizer_dir):
    meta = {"trtllm_version": "1.2.1", "gpu_compute_capability": "9.0", "gpu_name": "NVIDIA H100"}
    engine = trtllm_engine(tmp_path / "engine", manifest=meta)
    write(engine_recipe(), engine, tokenizer_dir, tmp_path / "ok", trtllm_version="1.2.1")
    with pytest.raises(RepoError, match="built for GPU compute capability 9.0 .* this GPU is compute capability 8.0"):
        write(engine_recipe(), engine, tokenizer_dir, tmp_path / "repo", gpu_compute_capability="8.0",
              trtllm_version="1.2.1")
    with pytest.raises(RepoError, match="built with TensorRT-LLM 1.2.1, but the serving side has TensorRT-LLM 1.3.0"):
        write(engine_recipe(), engine, tokenizer_dir, tmp_path / "repo", trtllm_version="1.3.0")
    with pytest.raises(RepoError, match="this GPU is compute capability 8.0"):
        write(engine_recipe("A100-80"), engine, tokenizer_dir, tmp_path / "repo", trtllm_version="1.2.1")


def test_engine_dir_of_another_target(tmp_path, tokenizer_dir):
    engine = reference_engine(tmp_path / "engine")
    EngineManifest(target="trtllm-llmapi").write(engine)
    with pytest.raises(RepoError, match="built for target trtllm-llmapi, but build.target is reference"):
        write(recipe(), engine, tokenizer_dir, tmp_path / "repo")
    with pytest.raises(RepoError, match="engine_config.json is missing: build target reference first"):
        write(recipe(), tmp_path / "nothing", tokenizer_dir, tmp_path / "repo")


def test_tokenizer_must_be_present(tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    with pytest.raises(RepoError, match=r"tokenizer_dir .*tok has no tokenizer .*`enginesmith convert RECIPE`"):
        write(recipe(), reference_engine(tmp_path / "engine"), empty, tmp_path / "repo")


def test_llmapi_repository(tmp_path, tokenizer_dir):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "model.yaml").write_text(yaml.safe_dump({
        "model": "/models/tiny", "backend": "pytorch", "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
        "max_batch_size": 16, "triton_config": {"max_batch_size": 0, "decoupled": True}}))
    r = recipe(build={"target": "trtllm-llmapi"})
    m = write(r, engine, tokenizer_dir, tmp_path / "repo")
    assert m.models == ["tensorrt_llm"] and any("model.py is not written" in w for w in m.warnings)
    assert (tmp_path / "repo/tensorrt_llm/1/model.yaml").read_text() == (engine / "model.yaml").read_text()
    cfg = config(tmp_path / "repo", "tensorrt_llm")
    assert cfg.backend == "python" and cfg.model_transaction_policy.decoupled
    upstream_py = tmp_path / "model.py"
    upstream_py.write_text("# TensorRT-LLM's llmapi model\n")
    m = write(r, engine, tokenizer_dir, tmp_path / "repo2", llmapi_model_py=upstream_py)
    assert (tmp_path / "repo2/tensorrt_llm/1/model.py").read_text() == upstream_py.read_text() and not m.warnings


def test_several_postprocessing_instances_warn_about_streaming(tmp_path, tokenizer_dir):
    m = write(recipe(serve={"postprocessing_instances": 2}), reference_engine(tmp_path / "engine"), tokenizer_dir,
              tmp_path / "repo")
    assert any("postprocessing_instances=2" in w for w in m.warnings)
    assert config(tmp_path / "repo", "postprocessing").instance_group[0].count == 2


def test_out_dir_parent_created(tmp_path, tokenizer_dir):
    out = tmp_path / "a" / "b" / "repo"
    write(recipe(), reference_engine(tmp_path / "engine"), tokenizer_dir, out)
    assert (out / "manifest.json").is_file()
    shutil.rmtree(out)


def test_stream_interval_reaches_the_reference_model_and_is_named_elsewhere(tmp_path, tokenizer_dir):
    engine = reference_engine(tmp_path / "engine")
    trtllm_engine(engine)
    write(recipe(), engine, tokenizer_dir, tmp_path / "default")
    assert "stream_interval" not in config(tmp_path / "default", "tensorrt_llm").parameters  # upstream's keys only
    m = write(recipe(serve={"stream_interval": 4}), engine, tokenizer_dir, tmp_path / "ref")
    assert config(tmp_path / "ref", "tensorrt_llm").parameters["stream_interval"].string_value == "4"
    assert not m.warnings
    m = write(engine_recipe(serve={"stream_interval": 4}), engine, tokenizer_dir, tmp_path / "eng",
              trtllm_version="1.2.1")
    assert "stream_interval" not in config(tmp_path / "eng", "tensorrt_llm").parameters
    assert any(w.startswith("serve.stream_interval=4 applies to the reference runtime only") for w in m.warnings)
    with pytest.raises(ValueError, match="stream_interval"):
        recipe(serve={"stream_interval": 0})
