"""`enginesmith tiny-model` and `enginesmith convert RECIPE` end to end (recipe -> plan -> fetch -> convert)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from enginesmith.builders.cli import app
from enginesmith.builders.convert import CheckpointManifest
from tests.support import REPO_ROOT, tiny_hf_model

runner = CliRunner()


def write_recipe(path, source, name="tiny-llama", parallel="{tp_size: 2, pp_size: 2}", weights="none"):
    path.write_text(f"""name: {name}
model:
  source: {source}
  dtype: float32
hardware:
  gpu: H100
parallel: {parallel}
quantization:
  weights: {weights}
build:
  target: reference
  max_input_len: 256
  max_seq_len: 512
""")
    return path


def test_tiny_model_command(tmp_path):
    res = runner.invoke(app, ["tiny-model", str(tmp_path / "m"), "--arch", "qwen2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and (tmp_path / "m" / "tokenizer.json").is_file()
    bad = runner.invoke(app, ["tiny-model", str(tmp_path / "x"), "--arch", "gpt2"])
    assert bad.exit_code == 1 and "choose one of llama, mixtral, qwen2" in bad.output


def test_convert_command_writes_checkpoint_and_reruns_as_noop(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_hf_model("llama"))
    res = runner.invoke(app, ["convert", str(recipe), "--out", str(tmp_path / "out"), "--workers", "2"])
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "out" / "tiny-llama" / "checkpoint"
    manifest = CheckpointManifest.read(ckpt)
    assert manifest.rank_files == [f"rank{r}.safetensors" for r in range(4)]
    assert manifest.mapping["tp_size"] == 2 and manifest.mapping["pp_size"] == 2
    assert manifest.source["revision"].startswith("local:") and manifest.is_complete(ckpt, manifest.key)
    assert manifest.plan["mapping"]["tp_size"] == 2 and manifest.inputs["plan"]
    assert set(manifest.versions) >= {"safetensors", "torch", "transformers"}
    assert (tmp_path / "out" / "tiny-llama" / "hf").is_symlink()
    assert json.loads((ckpt / "config.json").read_text())["mapping"]["world_size"] == 4
    assert "wrote 4 rank file(s)" in res.output
    assert "tp_size=2 pp_size=2 dtype=float32" in res.output and "moe_" not in res.output  # dense: no expert split
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    again = runner.invoke(app, ["convert", str(recipe), "--out", str(tmp_path / "out")])
    assert again.exit_code == 0, again.output
    assert f"checkpoint: up to date in {ckpt} (manifest key {manifest.key[:12]} unchanged); nothing written" \
        in again.output and "wrote" not in again.output
    assert sorted(p for p in ckpt.rglob("*") if p.is_file()) == files  # nothing rewritten, not even the manifest
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == stamps
    (ckpt / "rank2.safetensors").unlink()
    third = runner.invoke(app, ["convert", str(recipe), "--out", str(tmp_path / "out")])
    assert third.exit_code == 0 and "wrote 1 rank file(s)" in third.output and "(3 reused)" in third.output
    assert CheckpointManifest.read(ckpt).is_complete(ckpt, manifest.key)


def test_convert_ranks_of_one_node_report_what_was_written_and_rerun_as_noop(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_hf_model("llama"))
    ckpt = tmp_path / "out" / "tiny-llama" / "checkpoint"
    node1 = runner.invoke(app, ["convert", str(recipe), "--out", str(tmp_path / "out"), "--ranks", "2,3"])
    assert node1.exit_code == 0 and "wrote 2 rank file(s)" in node1.output and "reused" not in node1.output
    assert sorted(p.name for p in ckpt.glob("rank*")) == ["rank2.safetensors", "rank3.safetensors"]
    again = runner.invoke(app, ["convert", str(recipe), "--out", str(tmp_path / "out"), "--ranks", "2,3"])
    assert again.exit_code == 0 and "checkpoint: up to date in" in again.output and "wrote" not in again.output
    full = runner.invoke(app, ["convert", str(recipe), "--out", str(tmp_path / "out")])
    assert full.exit_code == 0 and "wrote 2 rank file(s)" in full.output and "(2 reused)" in full.output
    assert CheckpointManifest.read(ckpt).rank_files == [f"rank{r}.safetensors" for r in range(4)]


def test_convert_command_pickle_policy_and_quantization(tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    hf = tiny_hf_model("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / name, src / name)
    torch.save(load_file(hf / "model.safetensors"), src / "pytorch_model.bin")
    recipe = write_recipe(tmp_path / "r.yaml", src, name="pickled", parallel="{tp_size: 2}",
                          weights="int8_weight_only")
    refused = runner.invoke(app, ["convert", str(recipe), "--out", str(tmp_path / "out")])
    assert refused.exit_code == 1 and "--allow-pickle" in refused.output
    ok = runner.invoke(app, ["convert", str(recipe), "--out", str(tmp_path / "out"), "--allow-pickle"])
    assert ok.exit_code == 0, ok.output
    ckpt = tmp_path / "out" / "pickled" / "checkpoint"
    rank1 = load_file(ckpt / "rank1.safetensors")
    assert rank1["transformer.layers.0.attention.qkv.weight"].dtype == torch.int8
    assert "transformer.layers.0.attention.qkv.per_channel_scale" in rank1
    assert json.loads((ckpt / "config.json").read_text())["quantization"]["quant_algo"] == "W8A16"


def test_convert_from_another_directory_names_the_missing_model_folder(tmp_path, monkeypatch):
    """The README's example recipe (model.source: out/tiny-llama-hf) run where that folder does not exist."""
    from types import SimpleNamespace

    from huggingface_hub.errors import RepositoryNotFoundError

    from tests.test_download import no_hub

    recipe = REPO_ROOT / "recipes" / "tiny-llama.yaml"
    monkeypatch.chdir(tmp_path)
    missing = RepositoryNotFoundError("401 Client Error.", response=SimpleNamespace(headers={}, request=None))
    calls = no_hub(monkeypatch, missing)
    fresh = runner.invoke(app, ["convert", str(recipe), "--out", "out"])  # no out/ yet: it could be a Hub id
    assert fresh.exit_code == 1 and len(calls) == 1
    assert f"no local folder {tmp_path / 'out' / 'tiny-llama-hf'} either (resolved relative to the current directory " \
           f"{tmp_path}" in fresh.output.replace("\n", "")
    (tmp_path / "out").mkdir()
    res = runner.invoke(app, ["convert", str(recipe), "--out", "out"])  # out/ exists: a path, the Hub is not asked
    assert res.exit_code == 1 and len(calls) == 1 and "Traceback" not in res.output
    assert f"model.source='out/tiny-llama-hf': no folder {tmp_path / 'out' / 'tiny-llama-hf'} (a path: out/ is a " \
           "folder here; resolved relative to the current directory" in res.output.replace("\n", "")


@pytest.mark.parametrize("content,says", [
    (b'{"x": \xff', "is not valid JSON (UnicodeDecodeError: "),
    (b'{"architectures": ["LlamaForCausalLM"], ', "is not valid JSON (JSONDecodeError: "),
    (b"[1]", "holds a JSON list, not the model's settings (an object)"),
])
def test_a_corrupted_config_json_is_one_line_naming_it(tmp_path, content, says):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_model("llama"), hf)
    (hf / "config.json").write_bytes(content)
    recipe = write_recipe(tmp_path / "r.yaml", hf, parallel="{tp_size: 1}")
    for command in (["plan", str(recipe)], ["convert", str(recipe), "--out", str(tmp_path / "out")]):
        r = runner.invoke(app, command)
        assert r.exit_code in (1, 2) and "Traceback" not in r.output and not isinstance(r.exception, ValueError)
        assert f"{hf / 'config.json'} {says}" in r.output and "the file is corrupted, download it again" in r.output
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_hf_model("llama"), wrong)
    cfg = json.loads((wrong / "config.json").read_text()) | {"hidden_size": "sixty-four"}
    (wrong / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["convert", str(write_recipe(tmp_path / "w.yaml", wrong, parallel="{tp_size: 1}")),
                            "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"error: config.json of {wrong} has a setting of the wrong type (invalid literal for int()" in r.output
