"""The batch-1 decode step from fused GEMV kernels: five kernels per dense layer, six per MoE layer.

Per layer: [RMSNorm + qkv (+ bias) + rotary + KV-cache write] -> [attention] -> [o_proj + residual]
-> [RMSNorm + gate/up + SwiGLU] -> [down + residual]; then [final RMSNorm + lm_head -> float32]
(runtime/kernels/triton_gemv.py); a Mixtral MoE block is [router] -> [experts' gate/up] -> [experts' down +
residual] (runtime/kernels/triton_moe_gemv.py). The cuBLAS path (runtime/fast/decode_step.py's regions) needs six
more kernels per dense layer: two norms, rotary + cache write, SiLU * up, and split-K reductions.
With tp > 1 the all-reduce follows o_proj and down (or the MoE block), and only TP rank 0 adds the
residual into its partial, so the reduced sum is h + every rank's partial. On Hopper the kernels launch with
programmatic dependent launch (runtime/kernels/pdl.py); given a TP exchange
(runtime/parallel/tp_exchange.py) the all-reduces
go through peer memory instead: a small kernel per point (mode "kernel", its default; MoE blocks too), the
producer GEMV's stores and a summing kernel ("split"; MoE blocks take the kernel), or the GEMVs alone ("fused",
dense layers only), and the logits gather through lm_head's stores. Opt-in (`rows`), dense models also run
steps of 2..64 rows this way: the projections through runtime/kernels/triton_rows.py's tensor-core kernels (same
fusions), rotary and the KV-cache write through `rope_write`'s kernel.

`GemvDecode.try_build` checks each fused kernel on the model's own layer-0 weights against the unfused
arithmetic before the step uses it; a failure leaves the step on the cuBLAS path, with the reason (and a
qkv kernel whose rotary epilogue fails its check leaves rotary to runtime/fast/decode_rope_write.py).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from enginesmith.runtime.kernels.gemv_ref import check_tol, gemv_ref, rel_err
from enginesmith.runtime.model.model import RankModel

log = logging.getLogger(__name__)
Collective = Callable[[torch.Tensor], torch.Tensor]


class GemvDecode:
    def __init__(self, model: RankModel, rope_write, attention, reduce: Collective, gather: Collective, gemv,
                 qkv_rope=None, moe_kernels=None, pdl: bool = False, exchange=None, rows=None):
        """qkv_rope: triton_gemv.qkv_rope_gemv (rotary and the KV-cache write in the qkv kernel's epilogue),
        or None: the qkv kernel, then `rope_write`'s kernel. moe_kernels: runtime.kernels.triton_moe_gemv (MoE layers).
        pdl: launch the GEMVs with programmatic dependent launch (runtime/kernels/pdl.py). exchange: an enabled
        runtime.parallel.tp_exchange.TPExchange (tp > 1; mode "fused": dense layers): the batch-1 step's all-reduces and
        logits gather go through it (in its `mode`) instead of `reduce` / `gather`. rows: triton_rows.gemm_rows
        (dense models): steps of 2..MAX_ROWS rows run here too."""
        self.model, self.rope_write, self.attention = model, rope_write, attention
        self.reduce, self.gather, self._qkv_rope = reduce, gather, qkv_rope
        self._gemv = partial(gemv, pdl=True) if pdl else gemv
        self._moe, self.pdl, self.exchange = moe_kernels, pdl, exchange
        self._rows = (partial(rows, pdl=True) if pdl else rows) if rows is not None else None
        self.max_rows = (importlib.import_module("enginesmith.runtime.kernels.triton_rows").MAX_ROWS
                         if rows is not None else 1)
        self.add_residual = model.coords.tp_rank == 0
        if exchange is not None and exchange.mode == "fused" and any(w.router is not None for w in model.layers):
            raise ValueError("the fused TP exchange covers dense layers only")

    def handles(self, rows: int) -> bool:
        """Whether a step of `rows` sequences runs here (else on the cuBLAS regions path)."""
        return 1 <= rows <= self.max_rows

    @classmethod
    def try_build(cls, model: RankModel, rope_write, attention, reduce: Collective, gather: Collective,
                  exchange=None, pdl: bool = False, rows: bool = False) -> tuple[GemvDecode | None, str]:
        """(the step, a note) or (None, why not). exchange: a runtime.parallel.tp_exchange.TPExchange (tp > 1) the
        step uses when it is enabled (mode "fused": if the model is dense); pdl: programmatic dependent launch;
        rows: also steps of 2..64 rows (dense models, if the rows kernels pass their own check)."""
        if not (model.is_first_stage and model.is_last_stage):
            return None, "pp_size > 1"
        moe = any(w.router is not None for w in model.layers)
        try:
            triton_gemv = importlib.import_module("enginesmith.runtime.kernels.triton_gemv")
            moe_kernels = importlib.import_module("enginesmith.runtime.kernels.triton_moe_gemv") if moe else None
        except ImportError as e:
            return None, f"triton is not importable ({e})"
        try:
            err = check_on_model(model, triton_gemv.gemv, gemv_ref, moe_kernels)
        except Exception as e:  # a compile error must not take the engine down: the cuBLAS path still works
            log.warning("fused GEMV kernels unusable: %s", e)
            return None, f"fused GEMV kernels failed ({type(e).__name__}: {str(e)[:300]})"
        tol = check_tol(model.dtype)
        if not err < tol:
            return None, f"fused GEMV self-check relative error {err:.3g} over {tol:g}"
        qkv_rope, rope_note = _try_qkv_rope(model, triton_gemv, tol)
        if qkv_rope is not None and pdl:
            qkv_rope = partial(qkv_rope, pdl=True)
        use_ex = exchange is not None and exchange.serves(moe)
        ex_note = ("; all-reduces and logits gather fused into the GEMVs (TP exchange)" if use_ex and
                   exchange.mode == "fused" else
                   f"; all-reduces as exchange kernels ({exchange.mode}), logits gather fused into lm_head (TP "
                   "exchange)" if use_ex else
                   f"; TP exchange off ({exchange.reason or 'fused mode, MoE layers'})" if exchange is not None else
                   "")
        gemm_rows, rows_note = _try_rows(model, tol) if rows and not moe else (None, "")
        step = cls(model, rope_write, attention, reduce, gather, triton_gemv.gemv, qkv_rope, moe_kernels, pdl,
                   exchange if use_ex else None, gemm_rows)
        return step, (f"fused GEMV kernels, self-check {err:.1e}; {rope_note}; PDL {'on' if pdl else 'off'}{ex_note}"
                      f"{rows_note}")

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, batch, k_layers: list[torch.Tensor],
                 v_layers: list[torch.Tensor]) -> torch.Tensor:
        """B rows (B <= max_rows): (B,) ids and positions -> (B, V_pad) float32 logits; writes the rows' K/V into
        the cache."""
        m = self.model
        one = input_ids.shape[0] == 1
        ex = self.exchange if one else None
        if ex is not None and ex.mode == "fused":
            return self._exchange_step(input_ids, positions, batch, k_layers, v_layers)
        gemv = self._gemv if one else self._rows
        reduced, reduce_partial = self._reducers(gemv, ex)
        eps = m.cfg.norm_epsilon
        h = F.embedding(input_ids, m.embedding)
        cos, sin = m.rope(positions)
        for i, w in enumerate(m.layers):
            o = self._attend(h, w, cos, sin, batch, k_layers[i], v_layers[i], linear=gemv)
            h = reduced(o.reshape(h.shape[0], -1), w.dense, h if self.add_residual else None)
            res = h if self.add_residual else None
            if w.router is None:
                act = gemv(h, w.gate_up, norm=w.post_layernorm, eps=eps, swiglu=True)
                h = reduced(act, w.proj, res)
            else:
                cfg = m.cfg
                ids, prob = self._moe.moe_router(h, w.post_layernorm, eps, w.router, cfg.moe_top_k,
                                                 cfg.moe_normalization_mode == 1)
                act = self._moe.moe_up(h, w.fc, w.post_layernorm, eps, ids, m.experts.start)
                h = reduce_partial(self._moe.moe_down(act, w.proj, ids, prob, m.experts.start, residual=res))
        if ex is not None:
            gemv(h, m.lm_head, norm=m.ln_f, eps=eps, out_f32=True, send=ex.send_logits())
            return ex.wait_logits()
        return self.gather(gemv(h, m.lm_head, norm=m.ln_f, eps=eps, out_f32=True))

    def _reducers(self, gemv, ex):
        """(reduced, reduce_partial): reduced(x, weight, residual) is the all-reduced residual GEMV,
        reduce_partial(y) the all-reduce of a partial (a MoE block's output). Without the exchange both use
        `reduce`; with it in mode "kernel" / "split" (a new step begins) point 2i follows layer i's o_proj and
        2i + 1 its down or MoE block: a reduce kernel after the producer, or (split, dense GEMVs) the GEMV
        storing into the slots and a kernel summing them."""
        if ex is None:
            return (lambda x, weight, res: self.reduce(gemv(x, weight, residual=res))), self.reduce
        ex.begin_step()
        points = iter(range(2 * self.model.num_local_layers))

        def reduce_partial(y):
            return ex.all_reduce(next(points), y)

        def reduced(x, weight, res):
            if ex.mode == "split":
                point = next(points)
                gemv(x, weight, residual=res, send=ex.send(point))
                return ex.landed_sum(point)
            return reduce_partial(gemv(x, weight, residual=res))
        return reduced, reduce_partial

    def _attend(self, h, w, cos, sin, batch, kc, vc, recv=None, linear=None) -> torch.Tensor:
        """[RMSNorm + qkv + rotary + KV write] then attention for one layer -> o (B, nq, d); with `recv` (the
        TP exchange) h is where the qkv kernel writes the summed residual stream. linear: the projection for
        B > 1 rows (qkv, then `rope_write`'s kernel)."""
        m, eps = self.model, self.model.cfg.norm_epsilon
        if h.shape[0] > 1:
            qkv = linear(h, w.qkv, norm=w.input_layernorm, eps=eps, bias=w.qkv_bias)
            q = self.rope_write(qkv, cos, sin, kc, vc, batch.slots, batch.src_rows)
        elif self._qkv_rope is not None:
            q = self._qkv_rope(h, w.qkv, w.input_layernorm, eps, w.qkv_bias, cos, sin, batch.slots, kc, vc,
                               m.num_heads, m.num_kv_heads, m.head_size, recv=recv)
        else:
            qkv = self._gemv(h, w.qkv, norm=w.input_layernorm, eps=eps, bias=w.qkv_bias, recv=recv)
            q = self.rope_write(qkv, cos, sin, kc, vc, batch.slots, batch.src_rows)
        return self.attention(q, kc, vc, batch)

    def _exchange_step(self, input_ids, positions, batch, k_layers, v_layers) -> torch.Tensor:
        """The same step for tp > 1 with the exchange: point 2i carries layer i's o_proj partials to its
        gate/up kernel, point 2i + 1 the down partials to the next qkv kernel (or lm_head); each consumer
        writes the summed residual stream into a fresh `h` for the residual GEMV after it."""
        m, gemv, ex = self.model, self._gemv, self.exchange
        eps = m.cfg.norm_epsilon
        ex.begin_step()
        h = F.embedding(input_ids, m.embedding)
        cos, sin = m.rope(positions)
        recv = None
        for i, w in enumerate(m.layers):
            if recv is not None:
                h = torch.empty_like(h)
            o = self._attend(h, w, cos, sin, batch, k_layers[i], v_layers[i], recv)
            gemv(o.reshape(1, -1), w.dense, residual=h if self.add_residual else None, send=ex.send(2 * i))
            h = torch.empty_like(h)
            act = gemv(h, w.gate_up, norm=w.post_layernorm, eps=eps, swiglu=True, recv=ex.recv(2 * i))
            gemv(act, w.proj, residual=h if self.add_residual else None, send=ex.send(2 * i + 1))
            recv = ex.recv(2 * i + 1)
        gemv(torch.empty_like(h), m.lm_head, norm=m.ln_f, eps=eps, out_f32=True, recv=recv, send=ex.send_logits())
        return ex.wait_logits()


def check_on_model(model: RankModel, gemv, gemv_ref, moe_kernels=None, rows: int = 1) -> float:
    """Worst relative error of every fused variant the step uses, on layer 0's weights and `rows` random input
    rows (the MoE kernels, when given, on the first MoE layer against runtime/decode_layers.moe_mlp)."""
    w, eps, dev = model.layers[0], model.cfg.norm_epsilon, model.device
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(n: int) -> torch.Tensor:
        return torch.randn(rows, n, device=dev, generator=gen).to(model.dtype)

    hid = w.qkv.shape[1]
    cases = [
        (rnd(hid), w.qkv, dict(norm=w.input_layernorm, eps=eps, bias=w.qkv_bias)),
        (rnd(w.dense.shape[1]), w.dense, dict(residual=rnd(w.dense.shape[0]))),
        (rnd(hid), model.lm_head, dict(norm=model.ln_f, eps=eps, out_f32=True)),
    ]
    dense = next((lw for lw in model.layers if lw.router is None), None)
    if dense is not None:
        cases += [(rnd(hid), dense.gate_up, dict(norm=dense.post_layernorm, eps=eps, swiglu=True)),
                  (rnd(dense.proj.shape[1]), dense.proj, dict(residual=rnd(dense.proj.shape[0])))]
    errs = [_check_moe(model, moe_kernels, rnd(hid)[:1], rnd(hid)[:1])] if moe_kernels is not None else []
    with torch.inference_mode():
        for x, weight, kw in cases:
            ref = gemv_ref(x, weight, **kw).float()
            out = gemv(x, weight, **kw).float()
            errs.append(rel_err(out, ref))
    return max(errs)


def _check_moe(model: RankModel, kernels, h: torch.Tensor, res: torch.Tensor) -> float:
    from enginesmith.runtime.fast.decode_layers import moe_mlp
    from enginesmith.runtime.model.layers import rms_norm

    w, cfg = next(lw for lw in model.layers if lw.router is not None), model.cfg
    eps, k, renorm, first = cfg.norm_epsilon, cfg.moe_top_k, cfg.moe_normalization_mode == 1, model.experts.start
    with torch.inference_mode():
        ref = (res + moe_mlp(rms_norm(h, w.post_layernorm, eps), w.router, w.fc, w.proj, k, renorm, first,
                             grouped=False)).float()
        ids, prob = kernels.moe_router(h, w.post_layernorm, eps, w.router, k, renorm)
        out = kernels.moe_down(kernels.moe_up(h, w.fc, w.post_layernorm, eps, ids, first), w.proj, ids, prob, first,
                               residual=res).float()
    return rel_err(out, ref)


def _try_rows(model: RankModel, tol: float):
    """(gemm_rows, note) if the small-batch kernels match the unfused arithmetic on layer 0, else (None, why)."""
    try:
        triton_rows = importlib.import_module("enginesmith.runtime.kernels.triton_rows")
        err = check_on_model(model, triton_rows.gemm_rows, gemv_ref, rows=3)
    except Exception as e:  # the batch-1 kernels still serve; larger batches stay on the cuBLAS regions
        log.warning("small-batch GEMM kernels unusable: %s", e)
        return None, f"; batches 2+ on the cuBLAS regions (rows kernels failed: {type(e).__name__}: {str(e)[:200]})"
    if not err < tol:
        return None, f"; batches 2+ on the cuBLAS regions (rows kernels' self-check error {err:.3g})"
    return triton_rows.gemm_rows, f"; batches 2..{triton_rows.MAX_ROWS} through the rows kernels, self-check {err:.1e}"


def _try_qkv_rope(model: RankModel, triton_gemv, tol: float):
    """(qkv_rope_gemv, note) if it handles this model and matches the unfused ops on layer 0, else (None, why)."""
    from enginesmith.runtime.fast.decode_rope_write import rope_cache_write_ref

    w, dev, dt = model.layers[0], model.device, model.dtype
    nq, nkv, d = model.num_heads, model.num_kv_heads, model.head_size
    caches = [torch.zeros(1, 2, nkv, d, device=dev, dtype=dt) for _ in range(2)]
    why = triton_gemv.rope_unsupported(w.qkv, *caches, nq, nkv, d, dt)
    if why:
        return None, f"rotary in its own kernel ({why})"
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, w.qkv.shape[1], device=dev, generator=gen).to(dt)
    cos, sin = model.rope(torch.tensor([5], device=dev))
    slot, ref_caches = torch.tensor([1], device=dev), [c.clone() for c in caches]
    eps = model.cfg.norm_epsilon
    try:
        with torch.inference_mode():
            qkv = gemv_ref(x, w.qkv, norm=w.input_layernorm, eps=eps, bias=w.qkv_bias)
            ref = rope_cache_write_ref(qkv, cos, sin, *ref_caches, slot, torch.zeros_like(slot), nq, nkv, d)
            q = triton_gemv.qkv_rope_gemv(x, w.qkv, w.input_layernorm, eps, w.qkv_bias, cos, sin, slot, *caches,
                                          nq, nkv, d)
    except Exception as e:
        log.warning("qkv + rotary kernel unusable: %s", e)
        return None, f"rotary in its own kernel (qkv + rotary kernel failed: {type(e).__name__}: {str(e)[:200]})"
    errs = [rel_err(a, b) for a, b in ((q, ref), (caches[0], ref_caches[0]), (caches[1], ref_caches[1]))]
    if not max(errs) < tol:
        return None, f"rotary in its own kernel (qkv + rotary self-check error {max(errs):.3g})"
    return triton_gemv.qkv_rope_gemv, f"rotary + KV write in the qkv kernel, self-check {max(errs):.1e}"
