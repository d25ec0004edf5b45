"""One decode step's forward over static device buffers: embedding -> every layer -> logits.

No host work inside: all shapes are fixed by the batch bucket, all indexing uses device tensors, so
the whole call can be captured once in a CUDA graph and replayed. The compute between communication
points runs through runtime/fast/decode_layers.py, compiled with torch.compile when asked (one compiled
function serves every layer, since weights are arguments).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from enginesmith.runtime.fast import decode_layers
from enginesmith.runtime.fast.decode_attention import DecodeAttention, DecodeBatch
from enginesmith.runtime.fast.decode_gemv_step import GemvDecode
from enginesmith.runtime.fast.decode_rope_write import RopeWriter
from enginesmith.runtime.kernels.gemv_ref import check_tol, rel_err
from enginesmith.runtime.engine.kv_cache import PagedKVCache
from enginesmith.runtime.model.layers import rms_norm
from enginesmith.runtime.model.model import RankModel

log = logging.getLogger(__name__)
Collective = Callable[[torch.Tensor], torch.Tensor]
_REGIONS = ("pre_attention_qkv", "pre_attention", "dense_mlp", "post_attention_norm", "final_logits")


class DecodeStep:
    def __init__(self, model: RankModel, cache: PagedKVCache, attention: DecodeAttention, compile: bool,
                 reduce: Collective | None = None, gather: Collective | None = None,
                 rope_kernel: bool | None = None, gemv: bool | None = None, exchange=None, pdl: bool = False,
                 rows: bool | None = None, moe_rows: bool | None = None):
        """rope_kernel: the fused rotary + KV-cache write kernel (None: on CUDA if its self-check passes).
        gemv: batch-1 steps through fused GEMV kernels (runtime/fast/decode_gemv_step.py; None: on CUDA unless
        ENGINESMITH_GEMV=0, if its self-check passes; True: also off CUDA, e.g. Triton's interpreter);
        exchange and pdl go to that step (GemvDecode.try_build); rows: steps of 2..64 rows through that step's
        small-batch kernels too (dense models; None: only with ENGINESMITH_GEMM_ROWS=1: at 32 rows on an H200
        they were 3-4% slower than the cuBLAS regions, runtime-h200-x2-tp-rows.json). moe_rows: the experts of
        multi-token steps through runtime/kernels/triton_moe_rows.py's grouped kernels (None: on CUDA unless
        ENGINESMITH_MOE_ROWS=0; True: also off CUDA), if they match the model's MoE block on layer 0."""
        self.model, self.attention = model, attention
        self.reduce = reduce or (lambda x: x)
        self.gather = gather or (lambda x: x)
        self.k_layers = [cache.k[i] for i in range(model.num_local_layers)]
        self.v_layers = [cache.v[i] for i in range(model.num_local_layers)]
        self.rope_write = RopeWriter(cache.k[0], model.num_heads, model.num_kv_heads, model.head_size, rope_kernel)
        self.fallbacks = [self.rope_write.fallback] if self.rope_write.fallback else []
        self.compiled = False
        self.regions: dict[str, Callable] = {n: getattr(decode_layers, n) for n in _REGIONS}
        self.moe_grouped, self.moe_note = _check_grouped_moe(model) if model.cfg.is_moe else (False, "dense model")
        self.gemv, self.gemv_note = None, "off"
        on_cuda = cache.k.device.type == "cuda"
        self.moe_rows = None
        if model.cfg.is_moe and _wanted(moe_rows, on_cuda, "ENGINESMITH_MOE_ROWS"):
            self.moe_rows, rows_note = _try_moe_rows(model, self.moe_grouped)
            self.moe_note += f"; {rows_note}"
        if _wanted(gemv, on_cuda, "ENGINESMITH_GEMV"):
            if rows is None:
                rows = os.environ.get("ENGINESMITH_GEMM_ROWS", "0") == "1"
            self.gemv, self.gemv_note = GemvDecode.try_build(model, self.rope_write, attention, self.reduce,
                                                             self.gather, exchange, pdl, rows)
            if self.gemv is None and on_cuda:
                self.fallbacks.append(f"fused GEMV step unusable, cuBLAS regions at batch 1: {self.gemv_note}")
        if compile:
            self.enable_compile()

    def enable_compile(self) -> None:
        """Route the regions through torch.compile (they compile at their first call, outside any capture)."""
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # one compile per bucket shape may be needed
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        self.regions = {n: torch.compile(getattr(decode_layers, n), fullgraph=True) for n in _REGIONS}
        self.compiled = True

    def disable_compile(self) -> None:
        self.regions = {n: getattr(decode_layers, n) for n in _REGIONS}
        self.compiled = False

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        """(B,) ids and positions -> (B, V_pad) float32 logits; writes each row's K/V into the cache."""
        if self.gemv is not None and self.gemv.handles(input_ids.shape[0]):
            return self.gemv(input_ids, positions, batch, self.k_layers, self.v_layers)
        m, r = self.model, self.regions
        cfg, eps = m.cfg, m.cfg.norm_epsilon
        h = F.embedding(input_ids, m.embedding)
        cos, sin = m.rope(positions)
        res = torch.zeros_like(h)
        for i, w in enumerate(m.layers):
            kc, vc = self.k_layers[i], self.v_layers[i]
            if self.rope_write.kernel:  # one in-place kernel: no functionalized copy of the cache slice
                h, qkv = r["pre_attention_qkv"](h, res, w.input_layernorm, w.qkv, w.qkv_bias, eps)
                q = self.rope_write(qkv, cos, sin, kc, vc, batch.slots, batch.src_rows)
            else:
                h, q = r["pre_attention"](h, res, w.input_layernorm, w.qkv, w.qkv_bias, cos, sin, kc, vc,
                                          batch.slots, batch.src_rows, eps, m.num_heads, m.num_kv_heads, m.head_size)
            o = self.attention(q, kc, vc, batch)
            a = self.reduce(F.linear(o.reshape(o.shape[0], -1), w.dense))
            if w.router is None:
                h, res = r["dense_mlp"](h, a, w.post_layernorm, w.gate_up, w.proj, eps)
            else:
                h, x = r["post_attention_norm"](h, a, w.post_layernorm, eps)
                res = decode_layers.moe_mlp(x, w.router, w.fc, w.proj, cfg.moe_top_k,
                                            cfg.moe_normalization_mode == 1, m.experts.start, self.moe_grouped,
                                            self.moe_rows)
            res = self.reduce(res)
        return self.gather(r["final_logits"](h, res, m.ln_f, m.lm_head, eps))


def _wanted(asked: bool | None, on_cuda: bool, env: str) -> bool:
    """An optional kernel path's switch: as asked, or (None) on CUDA unless the environment variable says "0"."""
    return bool(asked) or (asked is None and on_cuda and os.environ.get(env, "1") != "0")


def _moe_block_err(model: RankModel, seed: int, grouped: bool = True, rows_kernels=None) -> float:
    """Relative error of decode_layers.moe_mlp (with these kernels) against RankModel.mlp_partial's MoE block on
    layer 0's experts, for 8 random tokens."""
    w, cfg = model.layers[0], model.cfg
    gen = torch.Generator(device=model.device).manual_seed(seed)
    h = torch.randn(8, cfg.hidden_size, device=model.device, generator=gen).to(model.dtype)
    with torch.inference_mode():
        ref = model.mlp_partial(0, h)
        x = rms_norm(h, w.post_layernorm, cfg.norm_epsilon)
        out = decode_layers.moe_mlp(x, w.router, w.fc, w.proj, cfg.moe_top_k, cfg.moe_normalization_mode == 1,
                                    model.experts.start, grouped, rows_kernels)
    return rel_err(out, ref)


def _try_moe_rows(model: RankModel, grouped: bool):
    """(runtime.kernels.triton_moe_rows, note) if its kernels pass `_moe_block_err`, else (None, why not)."""
    try:
        kernels = importlib.import_module("enginesmith.runtime.kernels.triton_moe_rows")
        err = _moe_block_err(model, 1, grouped, kernels)
    except Exception as e:  # no triton, or a compile error: the grouped GEMM still serves
        log.warning("MoE grouped rows kernels unusable: %s", e)
        return None, f"multi-token experts on the grouped GEMM (rows kernels failed: {type(e).__name__}: " \
                     f"{str(e)[:200]})"
    tol = check_tol(model.dtype)
    if not err < tol:
        return None, f"multi-token experts on the grouped GEMM (rows kernels off by {err:.3g})"
    return kernels, f"multi-token experts through the Triton grouped rows kernels, relative error {err:.1e}"


def _check_grouped_moe(model: RankModel) -> tuple[bool, str]:
    """Use the grouped GEMM only if it runs here and matches RankModel.mlp_partial on random tokens."""
    try:
        err = _moe_block_err(model, 0)
    except Exception as e:  # e.g. no grouped GEMM kernel for this dtype or card: the masked fallback still works
        log.warning("grouped-GEMM MoE unusable, using the masked fallback: %s", e)
        return False, f"grouped GEMM failed ({type(e).__name__}: {str(e)[:200]}); masked fallback"
    if not err < 2e-2:
        return False, f"grouped GEMM off by {err:.3g} against RankModel._moe; masked fallback"
    return True, f"grouped GEMM, relative error {err:.1e}"
