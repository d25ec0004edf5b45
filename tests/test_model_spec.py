"""Model specs: parameter and byte counts against published figures, shipped specs, unsupported architectures."""

from __future__ import annotations

import dataclasses
import json

import pytest

from enginesmith.builders.model_spec import ModelSpec, ModelSpecError
from enginesmith.builders.specs import (load_shipped, name_for_repo, resolve_spec, resolve_spec_offline, shipped_entry,
                                        shipped_names)
from enginesmith.builders.planner.weights import param_counts

# (spec, relative tolerance on total, on active). The three reference models must be within 0.5%.
PUBLISHED_TOLERANCE = {
    "llama-2-13b": (0.005, None),
    "llama-3-70b": (0.005, None),
    "mixtral-8x22b": (0.005, 0.005),
    "llama-3.1-8b": (0.005, None),
    "qwen2-7b": (0.005, None),
    "deepseek-v3": (0.005, 0.02),  # 37B active is quoted without the 0.9B input embedding
    "kimi-k2": (0.03, 0.03),  # the card rounds to "1T" and "32B"
}


def test_every_shipped_spec_with_published_counts_is_checked():
    published = {n for n in shipped_names() if "total_params" in shipped_entry(n)["published"]}
    assert published == set(PUBLISHED_TOLERANCE)


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOLERANCE))
def test_param_counts_match_published(name):
    spec, pub = load_shipped(name), shipped_entry(name)["published"]
    tol_total, tol_active = PUBLISHED_TOLERANCE[name]
    assert spec.num_params() == pytest.approx(pub["total_params"], rel=tol_total)
    if tol_active is not None:
        assert spec.num_active_params() == pytest.approx(pub["active_params"], rel=tol_active)
    else:
        assert spec.num_active_params() == spec.num_params()


def test_llama2_13b_count_by_hand():
    h, i, v, layers = 5120, 13824, 32000, 40
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o (MHA); gate, up, down; two RMSNorms
    expected = layers * per_layer + 2 * v * h + h  # untied embedding and lm_head; final norm
    assert expected == 13_015_864_320
    spec = load_shipped("llama-2-13b")
    assert spec.num_params() == expected
    assert spec.weight_bytes("float16") == 2 * expected


def test_mixtral_8x22b_total_and_active_by_hand():
    h, i, v, layers, e, k = 6144, 16384, 32768, 56, 8, 2
    attn = h * (48 * 128) * 2 + h * (8 * 128) * 2  # q, o; k, v (GQA 8 KV heads)
    expert = 3 * h * i
    per_layer_total = attn + e * expert + e * h + 2 * h  # + router + norms
    per_layer_active = attn + k * expert + e * h + 2 * h
    spec = load_shipped("mixtral-8x22b")
    assert spec.num_params() == layers * per_layer_total + 2 * v * h + h
    assert spec.num_active_params() == layers * per_layer_active + 2 * v * h + h


def test_kimi_k2_mla_and_shared_experts_by_hand():
    spec = load_shipped("kimi-k2")
    assert spec.is_mla and spec.is_moe and not spec.convertible
    h, nh = 7168, 64
    mla = (1536 * h + 1536 + nh * 192 * 1536  # q_a, q_a_norm, q_b
           + 576 * h + 512 + nh * 256 * 512 + h * nh * 128)  # kv_a (+rope), kv_a_norm, kv_b, o
    dense_mlp = 3 * h * 18432
    moe = 384 * 3 * h * 2048 + 3 * h * 2048 + 384 * h + 384  # routed, shared, router, correction bias
    expected = 61 * (mla + 2 * h) + dense_mlp + 60 * moe + 2 * 163840 * h + h
    assert spec.num_params() == expected
    by = param_counts(spec).by_component
    assert by["experts"] == 60 * 384 * 3 * h * 2048 and by["shared_experts"] == 60 * 3 * h * 2048


@pytest.mark.parametrize("name, kv_bytes", [("llama-2-13b", 819_200), ("llama-3-70b", 327_680),
                                            ("mixtral-8x22b", 229_376), ("deepseek-v3", 70_272),
                                            ("kimi-k2", 70_272)])
def test_kv_bytes_per_token_bf16(name, kv_bytes):
    assert load_shipped(name).kv_bytes_per_token(2) == kv_bytes


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from enginesmith.builders.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("llama", "mixtral")}


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_tiny_specs_match_the_generated_models(tiny_dirs, arch):
    generated = ModelSpec.from_pretrained_dir(tiny_dirs[arch])
    shipped = load_shipped(f"tiny-{arch}")
    skip = {"name", "extra"}
    for f in dataclasses.fields(ModelSpec):
        if f.name not in skip:
            assert getattr(generated, f.name) == getattr(shipped, f.name), f.name
    assert generated.num_params() == shipped.num_params()
    import safetensors.numpy

    tensors = safetensors.numpy.load_file(str(tiny_dirs[arch] / "model.safetensors"))
    assert sum(t.size for t in tensors.values()) == shipped.num_params()


def test_unsupported_architecture_says_not_supported_yet():
    with pytest.raises(ModelSpecError, match="not supported yet: GPT2LMHeadModel"):
        ModelSpec.from_hf_config({"architectures": ["GPT2LMHeadModel"], "n_embd": 768})
    with pytest.raises(ModelSpecError, match="not supported yet: <missing 'architectures'>"):
        ModelSpec.from_hf_config({})


def test_deepseek_shape_is_planning_only():
    cfg = shipped_entry("kimi-k2")["config"]
    with pytest.raises(ModelSpecError, match="not supported yet: DeepseekV3ForCausalLM"):
        ModelSpec.from_hf_config(cfg)
    spec = ModelSpec.from_hf_config(cfg, planning=True)
    with pytest.raises(ModelSpecError, match="not supported yet: DeepseekV3ForCausalLM for convert"):
        spec.check_convertible()
    load_shipped("llama-3-70b").check_convertible()  # no error


def test_missing_keys_and_folders(tmp_path):
    with pytest.raises(ModelSpecError, match="no config.json in"):
        ModelSpec.from_pretrained_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    with pytest.raises(ModelSpecError, match="lacks required key 'num_attention_heads'"):
        ModelSpec.from_pretrained_dir(tmp_path)


def test_spec_resolution_without_network(tmp_path, monkeypatch):
    from enginesmith.builders.recipe import ModelSection

    assert name_for_repo("META-LLAMA/Llama-2-13b-hf") == "llama-2-13b"
    assert resolve_spec(ModelSection(source="meta-llama/Llama-2-13b-hf")).num_hidden_layers == 40
    assert resolve_spec(ModelSection(source="anything", spec="kimi-k2")).num_experts == 384
    local = tmp_path / "m"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(shipped_entry("qwen2-7b")["config"]))
    monkeypatch.chdir(tmp_path)
    spec = resolve_spec(ModelSection(source="./m"))  # relative to the current directory
    assert spec.attn_bias and spec.hidden_size == 3584
    assert resolve_spec_offline(ModelSection(source="someone/unknown-model")) is None

    def offline(*args, **kwargs):
        raise ConnectionError("no network here")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(ModelSpecError, match="model.source='someone/unknown-model': cannot fetch config.json of "
                                             r"someone/unknown-model@main on the Hub \(ConnectionError: no network "
                                             r"here\), and no local folder .*; check the network and HF_TOKEN, .*set "
                                             "model.spec to one of deepseek-v3, "):
        resolve_spec(ModelSection(source="someone/unknown-model"))
    with pytest.raises(ModelSpecError, match=f"model.source='./gone': no folder {tmp_path / 'gone'} .*relative to "
                                             f"the current directory {tmp_path}"):
        resolve_spec(ModelSection(source="./gone"))


def test_rope_parameters_written_by_transformers_5():
    cfg = dict(shipped_entry("llama-3.1-8b")["config"])
    scaling = cfg.pop("rope_scaling")
    theta = cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_theta": theta, **scaling}
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.rope_theta == 500000.0
    assert spec.rope_scaling == scaling
    cfg["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    spec = ModelSpec.from_hf_config(cfg)
    assert (spec.rope_theta, spec.rope_scaling) == (1e6, None)
