"""The fused decode kernels (rotary + KV-cache write op, fused-merge split-KV attention) and their fallbacks.

CPU here: the custom op's reference branch, the step wiring around it and the self-checks run everywhere.
The Triton kernels themselves run on CUDA, or on CPU under Triton's interpreter (`TRITON_INTERPRET=1` with
triton installed); without either those tests skip (the venv has no triton: they need a GPU run).
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from enginesmith.runtime.fast import decode_layers
from enginesmith.runtime.fast.decode_attention import check_against_gather
from enginesmith.runtime.fast.decode_rope_write import RopeWriter, check_rope_write, rope_cache_write_ref
from enginesmith.runtime.fast.fast_decode import FastDecoder
from enginesmith.runtime.model.layers import rope_cos_sin
from enginesmith.runtime.model.paged_attention import SeqSpan
from enginesmith.runtime.model.plain_step import plain_forward
from tests.test_fast_decode import assert_close, prefilled, tiny

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1 with triton installed")
NQ, NKV, D = 8, 2, 16


def _inputs(b=3, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(b, (NQ + 2 * NKV) * D, generator=gen).to(device, dtype)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rope_cos_sin(torch.tensor([5, 0, 9])[:b].to(device), inv, dtype)
    cache = [torch.randn(4, 4, NKV, D, generator=gen).to(device, dtype) for _ in range(2)]
    return qkv, cos, sin, cache, torch.tensor([13, 2, 7])[:b].to(device), torch.arange(b).to(device)


def test_custom_op_is_the_old_region_arithmetic_and_writes_the_cache_in_place():
    qkv, cos, sin, (k, v), slots, src = _inputs()
    gen = torch.Generator().manual_seed(8)
    h, m, ln, w = (torch.randn(*s, generator=gen) for s in ((3, 24), (3, 24), (24,), (qkv.shape[1], 24)))
    k_old, v_old = k.clone(), v.clone()
    old_h, old_q = decode_layers.pre_attention(h, m, ln, w, None, cos, sin, k_old, v_old, slots, src, 1e-5,
                                               NQ, NKV, D)
    new_h, new_qkv = decode_layers.pre_attention_qkv(h, m, ln, w, None, 1e-5)
    q = torch.ops.enginesmith.rope_cache_write(new_qkv, cos, sin, k, v, slots, src, NQ, NKV, D, False)
    assert torch.equal(new_h, old_h) and torch.equal(q, old_q)
    assert torch.equal(k, k_old) and torch.equal(v, v_old) and not torch.equal(k, _inputs()[3][0])
    assert torch.equal(v.view(-1, NKV, D)[7], new_qkv[2, (NQ + NKV) * D:].view(NKV, D))  # V of row 2 at slot 7
    torch.library.opcheck(torch.ops.enginesmith.rope_cache_write.default,
                          (qkv, cos, sin, k, v, slots, src, NQ, NKV, D, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_rope_self_check_rejects_stray_writes_and_missing_rotary():
    k_layer = torch.zeros(6, 4, NKV, D)

    def stray(qkv, cos, sin, kc, vc, slots, src, nq, nkv, d):  # right values, plus one write elsewhere
        q = rope_cache_write_ref(qkv, cos, sin, kc, vc, slots, src, nq, nkv, d)
        vc.view(-1, nkv, d)[(slots.max() + 1) % vc.shape[0]] += 1
        return q

    def no_rotary(qkv, cos, sin, kc, vc, slots, src, nq, nkv, d):
        return rope_cache_write_ref(qkv, torch.ones_like(cos), torch.zeros_like(sin), kc, vc, slots, src, nq, nkv, d)

    assert check_rope_write(rope_cache_write_ref, k_layer, NQ, NKV, D) == 0.0
    assert check_rope_write(stray, k_layer, NQ, NKV, D) == float("inf")
    assert check_rope_write(no_rotary, k_layer, NQ, NKV, D) > 0.1


class _OpWriter:
    """RopeWriter taking the opaque-op branch of DecodeStep, the op running its reference arithmetic."""

    kernel, note, fallback = True, "test", None

    def __init__(self, model):
        self.args = (model.num_heads, model.num_kv_heads, model.head_size)

    def __call__(self, qkv, cos, sin, kc, vc, slots, src):
        return torch.ops.enginesmith.rope_cache_write(qkv, cos, sin, kc, vc, slots, src, *self.args, False)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_step_with_opaque_rope_write_matches_plain_path(compile):
    model = tiny()
    lens = [6, 13, 1]
    cache, seqs = prefilled(model, lens)
    fast_cache = copy.deepcopy(cache)
    ref = plain_forward(model, cache, [SeqSpan(s, p, 1) for s, p in zip(seqs, lens, strict=True)], [4, 5, 6])
    dec = FastDecoder(model, fast_cache, max_batch_size=4, max_seq_len=64, compile=compile)
    dec.step.rope_write = _OpWriter(model)
    out = dec.decode(seqs, [4, 5, 6], lens)
    assert_close(out, ref, 1e-4 if compile else 1e-5)
    assert_close(fast_cache.k, cache.k, 1e-5)
    assert_close(fast_cache.v, cache.v, 1e-5)
    assert not dec.status()["fallbacks"]


def test_unusable_rope_kernel_is_a_recorded_fallback_with_plain_results():
    model = tiny()
    cache, seqs = prefilled(model, [7, 3])
    fast_cache = copy.deepcopy(cache)
    ref = plain_forward(model, cache, [SeqSpan(s, p, 1) for s, p in zip(seqs, [7, 3], strict=True)], [1, 2])
    dec = FastDecoder(model, fast_cache, max_batch_size=2, max_seq_len=64, compile=False, rope_kernel=True)
    out = dec.decode(seqs, [1, 2], [7, 3])
    assert_close(out, ref)
    assert_close(fast_cache.k, cache.k, 1e-6)
    fallbacks = dec.status()["fallbacks"]
    if INTERPRET:  # the interpreter runs the kernel on CPU: it must pass its self-check
        assert dec.step.rope_write.kernel and not fallbacks
    else:
        assert not dec.step.rope_write.kernel
        assert len(fallbacks) == 1 and "fused rotary + KV-cache write kernel unusable" in fallbacks[0]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rope_write_kernel_matches_reference(dtype):
    from enginesmith.runtime.kernels.triton_rope_write import rope_write

    if dtype == torch.bfloat16 and KERNEL_DEVICE == "cpu":
        pytest.skip("bf16 under the interpreter is not a target")
    k_layer = torch.zeros(6, 4, NKV, D, dtype=dtype, device=KERNEL_DEVICE)
    err = check_rope_write(rope_write, k_layer, NQ, NKV, D)
    assert err < (1e-6 if dtype == torch.float32 else 1e-2)
    writer = RopeWriter(k_layer, NQ, NKV, D, want_kernel=True)
    assert writer.kernel and writer.fallback is None


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("splits", [None, 1, 2, 32])
@pytest.mark.parametrize("min_chunk", [64, 128])
def test_triton_attention_split_and_merge_paths_match_gather(fused, splits, min_chunk):
    from enginesmith.runtime.kernels.triton_decode_attention import TritonDecodeAttention

    k_layer = torch.zeros(8, 16, NKV, D, device=KERNEL_DEVICE)  # contexts up to 384 keys: up to 6 live splits
    impl = TritonDecodeAttention(NQ, NKV, D, torch.float32, 8, KERNEL_DEVICE, fused_merge=fused, min_chunk=min_chunk)
    impl.splits_override = splits
    for _ in range(2):  # the arrival counters reset themselves: a second launch merges again
        assert check_against_gather(impl, NQ, k_layer) < 1e-4
    assert int(impl.lock.abs().sum()) == 0


@needs_triton
def test_triton_split_count_respects_the_longest_context():
    from enginesmith.runtime.kernels.triton_decode_attention import TritonDecodeAttention

    impl = TritonDecodeAttention(32, 8, 128, torch.bfloat16, 1, KERNEL_DEVICE, min_chunk=128)
    impl.num_sms = 132
    assert impl.splits(1) == 32
    assert impl.splits(1, max_len=576) == 8  # 5 chunks of 128 keys cover it: 8 splits, not 4
    assert impl.splits(1, max_len=128) == 1
    assert impl.splits(64) == 1
