"""Converted ranks give transformers' logits: every valid (tp, pp, moe_ep, moe_tp) up to world size 8.

The oracle is `runtime.model.emulate.emulate_logits`, which runs all ranks of the checkpoint in one process (TP
partials summed, PP stages in order, experts on their owning ranks). Error measure throughout:
max |logits - reference| / max |reference| over all tokens and the whole vocab.

Quantized checkpoints are checked twice: exactly (<= 1e-4) against transformers running weights that went
through the same per-rank quantize -> dequantize, which pins down layout, slicing and scales; and, as the
stated quantization-noise tolerance on these random tiny models, against the float logits:
W8A16 <= 0.05 (dense) / 0.25 (MoE, where top-2 routing can flip), W4A16 <= 0.6 / 0.8.
"""

from __future__ import annotations

import pytest
import torch

from enginesmith.builders.convert import convert_checkpoint
from enginesmith.builders.convert.quantize import dequantize_weight_only, quantize_weight_only
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec
from enginesmith.builders.tiny_model import ARCH_DEFAULTS, MODEL_VOCAB
from enginesmith.runtime.model.emulate import emulate_logits
from tests.support import tiny_hf_model

ARCHS = ("llama", "qwen2", "mixtral")
PROMPTS = [[1, 5, 17, 200, 33, 9, 250, 4, 77, 100, 3, 314], [2, 150, 299, 8, 61, 42, 7]]
FLOAT_TOL = 1e-4
NOISE_TOL = {("W8A16", False): 0.05, ("W8A16", True): 0.25, ("W4A16", False): 0.6, ("W4A16", True): 0.8}


def valid_mappings(spec: ModelSpec, max_world: int = 8) -> list[Mapping]:
    """Every layout the converter must support for this model (TensorRT-LLM's divisibility rules)."""
    out = []
    nh, nkv, layers = spec.num_attention_heads, spec.num_key_value_heads, spec.num_hidden_layers
    for tp in range(1, max_world + 1):
        for pp in range(1, max_world // tp + 1):
            if nh % tp or (tp % nkv and nkv % tp) or pp > layers:
                continue
            if not spec.is_moe:
                out.append(Mapping.create(tp, pp))
                continue
            for ep in (e for e in range(1, tp + 1) if tp % e == 0):
                if spec.num_experts % ep == 0 and spec.moe_intermediate_size % (tp // ep) == 0:
                    out.append(Mapping.create(tp, pp, moe_ep_size=ep, moe_tp_size=tp // ep))
    return out


CASES = [(arch, m) for arch in ARCHS
         for m in valid_mappings(ModelSpec.from_hf_config(ARCH_DEFAULTS[arch] | {"vocab_size": MODEL_VOCAB}))]


def case_id(case) -> str:
    arch, m = case
    return f"{arch}-tp{m.tp_size}-pp{m.pp_size}-ep{m.moe_ep_size}-mtp{m.moe_tp_size}"


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([p])).logits[0] for p in PROMPTS])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def reference():
    """arch -> (hf dir, spec, transformers model, float32 logits); one model per arch for the module."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in ARCHS:
        hf = tiny_hf_model(arch)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        out[arch] = (hf, ModelSpec.from_pretrained_dir(hf), model, hf_logits(model))
    return out


def test_every_layout_is_enumerated():
    counts = {a: sum(1 for arch, _ in CASES if arch == a) for a in ARCHS}
    assert counts == {"llama": 9, "qwen2": 9, "mixtral": 19}  # tp in 1,2,4,8 x pp <= 3 with tp*pp <= 8; EP splits


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_logits_match_transformers(case, reference, tmp_path):
    arch, mapping = case
    hf, spec, _, ref = reference[arch]
    convert_checkpoint(hf, tmp_path, mapping, spec, "float32", workers=2, progress=False)
    got = emulate_logits(tmp_path, PROMPTS)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= FLOAT_TOL


def fake_quant(w: torch.Tensor, algo: str, col_parts: int) -> torch.Tensor:
    """What output channels look like after quantization on ranks that each hold in/col_parts inputs."""
    blocks = w.chunk(col_parts, dim=-1)
    return torch.cat([dequantize_weight_only(quantize_weight_only(b, algo), algo) for b in blocks], dim=-1)


def col_parts(name: str, mapping: Mapping) -> int | None:
    """How many input-column blocks the ranks quantize a transformers parameter in; None = stays float."""
    if ".experts." in name:  # transformers 5 fuses experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        return mapping.moe_tp_size if name.endswith("down_proj") else 1
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return mapping.tp_size  # row-parallel: each rank scales over its own input slice
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
        return 1
    return None


def quantized_hf_model(hf, algo: str, mapping: Mapping):
    """transformers model whose linear weights went through the per-rank quantize -> dequantize."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = col_parts(name, mapping)
            if parts is not None:
                p.copy_(fake_quant(p, algo, parts))
    return model


@pytest.mark.parametrize("arch,algo,layout", [
    ("llama", "W8A16", dict(tp_size=2, pp_size=2)),
    ("llama", "W4A16", dict(tp_size=8)),
    ("qwen2", "W8A16", dict(tp_size=4, pp_size=2)),
    ("mixtral", "W8A16", dict(tp_size=4, moe_ep_size=2)),
    ("mixtral", "W4A16", dict(tp_size=2, pp_size=3, moe_ep_size=1)),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{x}" for k, x in v.items()))
def test_weight_only_quantized_logits(arch, algo, layout, reference, tmp_path):
    hf, spec, _, float_ref = reference[arch]
    mapping = Mapping.create(**layout)
    convert_checkpoint(hf, tmp_path, mapping, spec, "float32", algo, progress=False)
    got = emulate_logits(tmp_path, PROMPTS)
    exact = hf_logits(quantized_hf_model(hf, algo, mapping))
    assert rel_err(got, exact) <= FLOAT_TOL
    noise = rel_err(got, float_ref)
    assert 0 < noise <= NOISE_TOL[algo, spec.is_moe]
