"""run_layers with the work between attention and the TP all-reduces compiled: the CUDA prefill path.

Eager, every RMSNorm, rotary and SwiGLU is several passes over (T, H) or (T, I) activations in float32
and ~40 launches per layer (a 16-layer, 8192-token Llama-3-8B stage on an H200: 110 ms eager, 85 ms of it
GEMMs). Here one torch.compile'd region per half layer does residual add + RMSNorm + QKV GEMM + rotary,
and residual add + RMSNorm + gate/up GEMM + SwiGLU + down GEMM (runtime/fast/decode_layers.py's dense_mlp);
attention, the output projection and the all-reduces stay outside. Weights are arguments, so one graph
serves every layer; shapes are automatic-dynamic: the token count turns symbolic at its first change and
the weights' dims stay static (all-symbolic `dynamic=True` graphs cost ~8% more GPU time at 8192 tokens
and ~25% more host time per call, which bounds small prefills). The residual add of a block is
deferred into the next region, so the arithmetic is runtime.parallel.pipeline.run_layers' up to float rounding.

runtime/fast/prefill_graphs.py replays these regions from CUDA graphs; its `layer_runner(device)` picks the
runner (ENGINESMITH_PREFILL_COMPILE=0: run_layers). Before its first step PrefillLayers compiles and checks
its regions against the eager ones on a few tokens; a compile error or a mismatch falls back to run_layers
for good, logged and kept in `fallback`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from enginesmith.runtime.fast import decode_layers
from enginesmith.runtime.kernels.gemv_ref import rel_err
from enginesmith.runtime.model.layers import apply_rope, rms_norm
from enginesmith.runtime.model.model import RankModel
from enginesmith.runtime.parallel.pipeline import MicroBatch, run_layers

log = logging.getLogger(__name__)
LayerRunner = Callable[[RankModel, Callable | None, torch.Tensor, MicroBatch], torch.Tensor]


def pre_attention_rope(h: torch.Tensor, m: torch.Tensor | None, ln: torch.Tensor, wqkv: torch.Tensor,
                       bqkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                       nq: int, nkv: int, d: int):
    """h (+ m, the previous block's reduced output) -> (h, q (T, nq, d), k (T, nkv, d), v (T, nkv, d)), q and k
    rotated: RankModel.attention_partial up to the attention call."""
    if m is not None:
        h = h + m
    qkv = F.linear(rms_norm(h, ln, eps), wqkv, bqkv)
    q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    return h, apply_rope(q.view(-1, nq, d), cos, sin), apply_rope(k.view(-1, nkv, d), cos, sin), v.reshape(-1, nkv, d)


def post_attention_mlp(h: torch.Tensor, a: torch.Tensor, ln: torch.Tensor, gate_up: torch.Tensor, proj: torch.Tensor,
                       eps: float):
    """decode_layers.dense_mlp under a code object of its own: Dynamo caches compiled graphs per code object,
    so the decode step's static per-bucket graphs and these token-count-dynamic ones do not share a cache."""
    return decode_layers.dense_mlp(h, a, ln, gate_up, proj, eps)


class PrefillLayers:
    """A LayerRunner: run_layers' arithmetic through compiled regions (eager ones with compile=False)."""

    def __init__(self, compile: bool = True):
        self.pre = pre_attention_rope
        self.mlp = post_attention_mlp
        self.compiled, self.checked, self.fallback = compile, False, ""
        if compile:
            self.pre = torch.compile(pre_attention_rope, fullgraph=True)
            self.mlp = torch.compile(post_attention_mlp, fullgraph=True)

    def __call__(self, model: RankModel, reduce: Callable | None, hidden: torch.Tensor,
                 mb: MicroBatch) -> torch.Tensor:
        if self.compiled and not self.checked:
            self.check(model)
        if self.fallback:
            return run_layers(model, reduce, hidden, mb)
        return self._layers(model, reduce or (lambda x: x), hidden, mb)

    def check(self, model: RankModel, tokens: int = 5) -> bool:
        """Compile both regions on a few random tokens of layer 0 (no communication: a failure here cannot
        leave TP peers waiting mid-step) and compare them with the eager regions; on an error or a mismatch
        fall back to run_layers for good. True when the compiled regions are in use."""
        self.checked = True
        w, eps = model.layers[0], model.cfg.norm_epsilon
        gen = torch.Generator(device=model.device).manual_seed(0)
        h, a = (torch.randn(tokens, model.cfg.hidden_size, generator=gen, device=model.device).to(model.dtype)
                for _ in range(2))
        cos, sin = model.rope(torch.arange(tokens, device=model.device))
        args = (h, a, w.input_layernorm, w.qkv, w.qkv_bias, cos, sin, eps, model.num_heads, model.num_kv_heads,
                model.head_size)
        try:
            got = list(self.pre(*args))
            want = list(pre_attention_rope(*args))
            if w.gate_up is not None:
                got += self.mlp(h, a, w.post_layernorm, w.gate_up, w.proj, eps)
                want += post_attention_mlp(h, a, w.post_layernorm, w.gate_up, w.proj, eps)
            err = max(rel_err(g, r) for g, r in zip(got, want, strict=True))
        except Exception as e:  # a compile error must not take the engine down: the eager layers still work
            self.fallback = f"torch.compile failed, prefill runs eager: {type(e).__name__}: {e}"
        else:
            if err > 2e-2:
                self.fallback = f"compiled prefill regions differ from eager ones (relative error {err:.2e})"
        if self.fallback:
            log.warning(self.fallback)
        return not self.fallback

    def status(self) -> dict:
        return dict(compiled=self.compiled and not self.fallback, graph_buckets=[], fallback=self.fallback)

    def _layers(self, model: RankModel, reduce: Callable, hidden: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        cos, sin = model.rope(mb.positions)
        d, nq, nkv, eps = model.head_size, model.num_heads, model.num_kv_heads, model.cfg.norm_epsilon
        m = None
        for i, w in enumerate(model.layers):
            hidden, q, k, v = self.pre(hidden, m, w.input_layernorm, w.qkv, w.qkv_bias, cos, sin, eps, nq, nkv, d)
            out = mb.attn(i, q, k, v)
            a = reduce(F.linear(out.reshape(out.shape[0], nq * d), w.dense))
            if w.gate_up is not None:
                hidden, m = self.mlp(hidden, a, w.post_layernorm, w.gate_up, w.proj, eps)
            else:  # MoE: the reference block (router and experts loop over the step's tokens)
                hidden = hidden + a
                m = model.mlp_partial(i, hidden)
            m = reduce(m)
        return hidden if m is None else hidden + m
