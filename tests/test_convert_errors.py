"""A checkpoint or layout that does not fit fails before anything is written, naming what was expected."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from enginesmith.builders.convert import ConvertError, convert_checkpoint
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec, ModelSpecError
from tests.support import tiny_hf_model


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama")


def altered(src: Path, dst: Path, change) -> Path:
    """Copy a tiny model and apply `change(tensors)` to its weights."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def convert(hf: Path, out: Path, mapping=None, dtype="float32", quantization=None, spec=None):
    spec = spec or ModelSpec.from_pretrained_dir(hf)
    return convert_checkpoint(hf, out, mapping or Mapping.create(tp_size=2), spec, dtype, quantization,
                              progress=False)


def assert_nothing_written(out: Path):
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \[128, 64\]\)"),
    (lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(24, 64)}),
     r"model\.layers\.2\.self_attn\.k_proj\.weight has shape \[24, 64\], expected \[16, 64\]"),
    (lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}),
     r"model\.norm\.weight has dtype I8, expected one of F32/F16/BF16"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}),
     r"tensor model\.layers\.0\.self_attn\.o_proj\.bias is not used by the llama weight map"),
])
def test_checkpoint_not_matching_config_fails_before_writing(tmp_path, llama, change, message):
    hf = altered(llama, tmp_path / "hf", change)
    with pytest.raises(ConvertError, match=message):
        convert(hf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_truncated_shard(tmp_path, llama):
    hf = tmp_path / "hf"
    shutil.copytree(llama, hf)
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(ConvertError, match=r"model\.safetensors is truncated: \d+ bytes, its header promises"):
        convert(hf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_unsupported_architecture(tmp_path, llama):
    hf = tmp_path / "hf"
    shutil.copytree(llama, hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ModelSpecError, match="not supported yet: GPTNeoXForCausalLM"):
        ModelSpec.from_pretrained_dir(hf)
    spec = dataclasses.replace(ModelSpec.from_pretrained_dir(llama), architecture="GPTNeoXForCausalLM")
    with pytest.raises(ConvertError, match="architecture GPTNeoXForCausalLM is not supported"):
        convert(llama, tmp_path / "out", spec=spec)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("mapping,message", [
    (dict(tp_size=3), "tp_size=3 must divide num_attention_heads=8"),
    (dict(pp_size=4), "pp_size=4 exceeds num_hidden_layers=3"),
    (dict(tp_size=2, moe_ep_size=2), "moe_ep_size=2 needs a MoE model"),
])
def test_layout_not_fitting_the_model(tmp_path, llama, mapping, message):
    with pytest.raises(ConvertError, match=message):
        convert(llama, tmp_path / "out", Mapping.create(**mapping))
    assert_nothing_written(tmp_path / "out")


def test_kv_heads_neither_split_nor_duplicated(tmp_path, llama):
    spec = dataclasses.replace(ModelSpec.from_pretrained_dir(llama), num_key_value_heads=3,
                               num_attention_heads=24, head_dim=8)
    with pytest.raises(ConvertError, match="tp_size=8 and num_key_value_heads=3: one must divide the other"):
        convert(llama, tmp_path / "out", Mapping.create(tp_size=8), spec=spec)


def test_moe_sizes(tmp_path):
    spec = ModelSpec.from_pretrained_dir(tiny_hf_model("mixtral"))
    odd = dataclasses.replace(spec, moe_intermediate_size=90, intermediate_size=90)
    with pytest.raises(ConvertError, match="moe_tp_size=4 must divide the expert intermediate_size=90"):
        convert(tiny_hf_model("mixtral"), tmp_path / "out", Mapping.create(tp_size=4), spec=odd)
    with pytest.raises(ConvertError, match="moe_ep_size=3 must divide num_local_experts=8"):
        convert(tiny_hf_model("mixtral"), tmp_path / "out", Mapping(world_size=3, tp_size=3, moe_ep_size=3),
                spec=dataclasses.replace(spec, num_attention_heads=3, num_key_value_heads=3, head_dim=8))
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kw,message", [
    (dict(dtype="int8"), "dtype='int8' is not supported; choose one of float32, float16, bfloat16"),
    (dict(quantization="fp8"), "quantization.weights='fp8' is not supported by convert"),
])
def test_bad_options(tmp_path, llama, kw, message):
    with pytest.raises(ConvertError, match=message):
        convert(llama, tmp_path / "out", **kw)
    assert_nothing_written(tmp_path / "out")


def test_float16_overflow_is_an_error_and_leaves_no_rank_file(tmp_path, llama):
    def big(t):
        t["model.layers.2.mlp.down_proj.weight"][0, 0] = 1e6
    hf = altered(llama, tmp_path / "hf", big)
    with pytest.raises(ConvertError, match="down_proj.weight has values outside the float16 range"):
        convert(hf, tmp_path / "out", Mapping.create(tp_size=1), dtype="float16")
    assert not list((tmp_path / "out").glob("rank*")) and not list((tmp_path / "out").glob(".*.tmp"))


def _corrupt_length(data: bytes) -> bytes:
    return b"\xff" * 8 + data[8:]


def _corrupt_utf8(data: bytes) -> bytes:
    return data[:9] + b"\xff\xfe" + data[11:]


def _not_json(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    return data[:8] + b"[" * n + data[8 + n:]


def _bad_entry(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = b'{"x": {"dtype": "F32"}}'.ljust(n)
    return data[:8] + header + data[8 + n:]


@pytest.mark.parametrize("corrupt,message", [
    (_corrupt_length, r"header length 18446744073709551615 exceeds the file \(\d+ bytes\)"),
    (_corrupt_utf8, r"header is not UTF-8 \(byte 1\)"),
    (_not_json, r"header is not JSON \(RecursionError\)"),
    (_bad_entry, r"entry 'x' lacks a dtype, shape or data_offsets"),
    (lambda data: data[:5], r"5 bytes, shorter than the 8-byte header length"),
])
def test_corrupted_safetensors_header_is_named(tmp_path, llama, corrupt, message):
    hf = tmp_path / "hf"
    shutil.copytree(llama, hf)
    (hf / "model.safetensors").write_bytes(corrupt((hf / "model.safetensors").read_bytes()))
    with pytest.raises(ConvertError, match=f"{hf / 'model.safetensors'} is not a valid safetensors file: {message}; "
                                           "the file is corrupted or not safetensors, download it again"):
        convert(hf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_corrupted_index_is_named(tmp_path, llama):
    hf = tmp_path / "hf"
    shutil.copytree(llama, hf)
    (hf / "model.safetensors.index.json").write_bytes(b'{"weight_map": \xff')
    with pytest.raises(ConvertError, match=r"model\.safetensors\.index\.json is not a safetensors index"):
        convert(hf, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
