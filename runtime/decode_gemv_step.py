"""The batch-1 decode step of a dense model from fused GEMV kernels: six kernels per layer.

Per layer: [RMSNorm + qkv (+ bias)] -> [rotary + KV-cache write] -> [attention] -> [o_proj + residual]
-> [RMSNorm + gate/up + SwiGLU] -> [down + residual]; then [final RMSNorm + lm_head -> float32]
(runtime/triton_gemv.py). The cuBLAS path (runtime/decode_step.py's regions) needs four more per layer:
two norms, SiLU * up, and split-K reductions. With tp > 1 the all-reduce follows o_proj and down, and
only TP rank 0 adds the residual into its partial, so the reduced sum is h + every rank's partial.

`GemvDecode.try_build` checks each fused kernel on the model's own layer-0 weights against the unfused
arithmetic before the step uses it; a failure leaves the step on the cuBLAS path, with the reason.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from runtime.gemv_ref import gemv_ref
from runtime.model import RankModel

log = logging.getLogger(__name__)
Collective = Callable[[torch.Tensor], torch.Tensor]


class GemvDecode:
    def __init__(self, model: RankModel, rope_write, attention, reduce: Collective, gather: Collective, gemv):
        self.model, self.rope_write, self.attention = model, rope_write, attention
        self.reduce, self.gather, self._gemv = reduce, gather, gemv
        self.add_residual = model.coords.tp_rank == 0

    @classmethod
    def try_build(cls, model: RankModel, rope_write, attention, reduce: Collective,
                  gather: Collective) -> tuple[GemvDecode | None, str]:
        """(the step, a note) or (None, why not)."""
        if model.cfg.is_moe or any(w.router is not None for w in model.layers):
            return None, "MoE model: the fused GEMV step covers dense MLPs"
        if not (model.is_first_stage and model.is_last_stage):
            return None, "pp_size > 1"
        try:
            triton_gemv = importlib.import_module("runtime.triton_gemv")
        except ImportError as e:
            return None, f"triton is not importable ({e})"
        try:
            err = check_on_model(model, triton_gemv.gemv, gemv_ref)
        except Exception as e:  # a compile error must not take the engine down: the cuBLAS path still works
            log.warning("fused GEMV kernels unusable: %s", e)
            return None, f"fused GEMV kernels failed ({type(e).__name__}: {str(e)[:300]})"
        tol = 1e-4 if model.dtype == torch.float32 else 2e-2
        if not err < tol:
            return None, f"fused GEMV self-check relative error {err:.3g} over {tol:g}"
        step = cls(model, rope_write, attention, reduce, gather, triton_gemv.gemv)
        return step, f"fused GEMV kernels, self-check {err:.1e}"

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, batch, k_layers: list[torch.Tensor],
                 v_layers: list[torch.Tensor]) -> torch.Tensor:
        """One row: (1,) id and position -> (1, V_pad) float32 logits; writes the row's K/V into the cache."""
        m, gemv = self.model, self._gemv
        eps = m.cfg.norm_epsilon
        h = F.embedding(input_ids, m.embedding)
        cos, sin = m.rope(positions)
        for i, w in enumerate(m.layers):
            kc, vc = k_layers[i], v_layers[i]
            qkv = gemv(h, w.qkv, norm=w.input_layernorm, eps=eps, bias=w.qkv_bias)
            q = self.rope_write(qkv, cos, sin, kc, vc, batch.slots, batch.src_rows)
            o = self.attention(q, kc, vc, batch)
            h = self.reduce(gemv(o.reshape(1, -1), w.dense, residual=h if self.add_residual else None))
            act = gemv(h, w.gate_up, norm=w.post_layernorm, eps=eps, swiglu=True)
            h = self.reduce(gemv(act, w.proj, residual=h if self.add_residual else None))
        return self.gather(gemv(h, m.lm_head, norm=m.ln_f, eps=eps, out_f32=True))


def check_on_model(model: RankModel, gemv, gemv_ref) -> float:
    """Worst relative error of every fused variant the step uses, on layer 0's weights and random inputs."""
    w, eps, dev = model.layers[0], model.cfg.norm_epsilon, model.device
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(n: int) -> torch.Tensor:
        return torch.randn(1, n, device=dev, generator=gen).to(model.dtype)

    hid = w.qkv.shape[1]
    cases = [
        (rnd(hid), w.qkv, dict(norm=w.input_layernorm, eps=eps, bias=w.qkv_bias)),
        (rnd(w.dense.shape[1]), w.dense, dict(residual=rnd(w.dense.shape[0]))),
        (rnd(hid), w.gate_up, dict(norm=w.post_layernorm, eps=eps, swiglu=True)),
        (rnd(w.proj.shape[1]), w.proj, dict(residual=rnd(w.proj.shape[0]))),
        (rnd(hid), model.lm_head, dict(norm=model.ln_f, eps=eps, out_f32=True)),
    ]
    errs = []
    with torch.inference_mode():
        for x, weight, kw in cases:
            ref = gemv_ref(x, weight, **kw).float()
            out = gemv(x, weight, **kw).float()
            errs.append(float((out - ref).norm() / ref.norm().clamp(min=1e-30)))
    return max(errs)
