"""Weight-only int8/int4 quantization: TensorRT-LLM's layout, packing order, scales and error bounds."""

from __future__ import annotations

import pytest
import torch

from enginesmith.builders.convert.quantize import dequantize_weight_only, quantize_weight_only, quantized_shapes


def test_int8_layout_is_transposed_with_per_output_channel_scale():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.25, 0.0, -0.125]])  # [out=2, in=3]
    q = quantize_weight_only(w, "W8A16")
    assert q["weight"].dtype == torch.int8 and q["weight"].shape == (3, 2)
    assert torch.allclose(q["per_channel_scale"], torch.tensor([2.0 / 127, 0.25 / 127]))
    assert q["weight"][:, 0].tolist() == [64, -127, 32]  # 1/(2/127)=63.5 -> 64 (round half to even)
    assert q["weight"][:, 1].tolist() == [127, 0, -64]


def test_int4_packs_even_column_in_low_nibble():
    w = torch.tensor([[7.0], [-8.0 * 7 / 8], [3.0], [-1.0]])  # [out=4, in=1]; scales make q = 7, -7, 7, -7
    q = quantize_weight_only(w, "W4A16")
    assert q["weight"].shape == (1, 2)
    lo, hi = q["weight"][0, 0].item() & 0x0F, (q["weight"][0, 0].item() >> 4) & 0x0F
    assert (lo, hi) == (7, 0x9)  # column 0 -> +7 in the low nibble, column 1 -> -7 (0b1001) in the high one
    assert dequantize_weight_only(q, "W4A16").flatten().tolist() == pytest.approx(w.flatten().tolist(), rel=1e-6)


@pytest.mark.parametrize("algo,levels", [("W8A16", 127), ("W4A16", 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_within_half_a_step(algo, levels, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(3, 48, 40, generator=g) * 0.1).to(dtype)  # batched: 3 experts [out=48, in=40]
    q = quantize_weight_only(w, algo)
    wshape, sshape = quantized_shapes(tuple(w.shape), algo)
    assert tuple(q["weight"].shape) == wshape and tuple(q["per_channel_scale"].shape) == sshape
    assert q["per_channel_scale"].dtype == dtype
    back = dequantize_weight_only(q, algo)
    assert back.shape == w.shape and back.dtype == dtype
    step = q["per_channel_scale"].float().unsqueeze(-1)  # [..., out, 1]
    err = (back.float() - w.float()).abs()
    # half a quantization step, plus rounding of the scale and of the output to the 16-bit dtype
    assert (err <= 0.5 * step + w.float().abs() * torch.finfo(dtype).eps + 1e-7).all()
    amax = w.float().abs().amax(-1)
    assert torch.allclose(q["per_channel_scale"].float(), (amax / levels).to(dtype).float())


def test_zero_channel_quantizes_to_zero():
    w = torch.zeros(4, 8)
    w[1] = 1.0
    for algo in ("W8A16", "W4A16"):
        back = dequantize_weight_only(quantize_weight_only(w, algo), algo)
        assert torch.equal(back, w)


def test_bad_algo_and_odd_int4_width_are_rejected():
    with pytest.raises(ValueError, match="not weight-only"):
        quantize_weight_only(torch.ones(2, 2), "FP8")
    with pytest.raises(ValueError, match="odd"):
        quantize_weight_only(torch.ones(3, 2), "W4A16")
