"""Weight-only int8 / int4 quantization in TensorRT-LLM's checkpoint layout (per-channel, symmetric).

Layout, as `symmetric_quantize_last_axis_of_batched_matrix` produces it before its GPU-specific step:
  weight            int8 [..., in, out]      W8A16: one value per byte
                    int8 [..., in, out / 2]  W4A16: two values per byte, even output column in the low nibble
  per_channel_scale [..., out]               in the checkpoint dtype; w ~= q * scale per output column
The weight is stored transposed (TensorRT-LLM's weight-only GEMM reads [in, out]); 3-D tensors are MoE experts.

Not done here: TensorRT-LLM's `preprocess_weights_for_mixed_gemm` (row permutation and interleaving for the
target SM). `trtllm-build` treats int8 weights as already preprocessed, so for the trtllm-engine target
`enginesmith convert` writes float weights with `quant_algo` set (`convert_checkpoint(prequantize=False)`),
which `trtllm-build` quantizes itself (`weight_only_quantize_dict`). These int8 tensors are for the reference
runtime, which dequantizes them at load with `dequantize_weight_only`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ALGOS = {"W8A16": 127.0, "W4A16": 7.0}
"""quant_algo -> largest quantized magnitude (TensorRT-LLM divides the column max by it)."""

RECIPE_ALGOS = {"none": None, "int8_weight_only": "W8A16", "int4_weight_only": "W4A16"}
"""Recipe `quantization.weights` values this converter handles -> TensorRT-LLM quant_algo."""

QUANTIZED_SUFFIXES = ("qkv.weight", "dense.weight", "fc.weight", "proj.weight", "gate.weight")
"""TensorRT-LLM's `weight_only_quantize_dict` list; embedding, lm_head, norms and the router stay float."""


def is_quantized(name: str) -> bool:
    return name.endswith(QUANTIZED_SUFFIXES) and not name.endswith("router.weight")


def scale_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "per_channel_scale"


def quantized_shapes(shape: tuple[int, ...], algo: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(weight shape, scale shape) stored for a float weight of `shape` [..., out, in]."""
    *batch, out, inp = shape
    packed = out // 2 if algo == "W4A16" else out
    return (*batch, inp, packed), (*batch, out)


def quantize_weight_only(w: torch.Tensor, algo: str) -> dict[str, torch.Tensor]:
    """w [..., out, in] (float) -> {"weight": int8 [..., in, out or out/2], "per_channel_scale": [..., out]}."""
    import torch

    if algo not in ALGOS:
        raise ValueError(f"quant_algo={algo!r} is not weight-only; choose one of {sorted(ALGOS)}")
    if algo == "W4A16" and w.shape[-2] % 2:
        raise ValueError(f"W4A16 packs output columns in pairs; out_features={w.shape[-2]} is odd")
    wf = w.float()
    scale = (wf.abs().amax(dim=-1) / ALGOS[algo]).to(w.dtype)  # [..., out], rounded to the stored dtype
    divisor = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    lim = ALGOS[algo]
    q = torch.round(wf / divisor).clamp_(-lim - 1, lim).to(torch.int8).transpose(-1, -2)  # [..., in, out]
    if algo == "W4A16":
        q = (q[..., 0::2] & 0x0F) | (q[..., 1::2] << 4)
    return {"weight": q.contiguous(), "per_channel_scale": scale.contiguous()}


def dequantize_weight_only(tensors: dict[str, torch.Tensor], algo: str) -> torch.Tensor:
    """Inverse of `quantize_weight_only`: -> w [..., out, in] in the scale's dtype."""
    import torch

    if algo not in ALGOS:
        raise ValueError(f"quant_algo={algo!r} is not weight-only; choose one of {sorted(ALGOS)}")
    q, scale = tensors["weight"], tensors["per_channel_scale"]
    if algo == "W4A16":
        low = (q << 4) >> 4  # arithmetic shifts sign-extend each nibble
        high = q >> 4
        q = torch.stack((low, high), dim=-1).flatten(-2)
    w = q.float() * scale.float().unsqueeze(-2)  # [..., in, out]
    return w.transpose(-1, -2).contiguous().to(scale.dtype)
