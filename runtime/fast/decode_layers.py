"""The pieces of one decode step between communication points, as pure functions of tensors.

Each function takes every weight as an argument (nothing closed over), so one `torch.compile` of it
serves all layers: Inductor fuses the residual add into RMSNorm and SiLU * up into one kernel; rotary
and the KV-cache write run between regions as one opaque in-place op (runtime/fast/decode_rope_write.py).
They use runtime/model/layers.py's arithmetic, so run eagerly they compute exactly what
RankModel.attention_partial / mlp_partial compute. The MoE block is graph-safe: no host sync
(grouped GEMM over expert-sorted tokens instead of a Python loop over hit experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from enginesmith.runtime.fast.decode_rope_write import rope_cache_write_ref
from enginesmith.runtime.model.layers import rms_norm, swiglu


def pre_attention_qkv(h: torch.Tensor, m: torch.Tensor, ln: torch.Tensor, wqkv: torch.Tensor,
                      bqkv: torch.Tensor | None, eps: float):
    """h + m (the previous MLP's output) -> (h, the fused qkv projection (B, (nq + 2 nkv) d)). Rotary and the
    KV-cache write follow outside the compiled region (runtime/fast/decode_rope_write.py)."""
    h = h + m
    return h, F.linear(rms_norm(h, ln, eps), wqkv, bqkv)


def pre_attention(h: torch.Tensor, m: torch.Tensor, ln: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, src_rows: torch.Tensor, eps: float, nq: int, nkv: int, d: int):
    """The fallback where the fused rope/cache-write kernel is unusable: pre_attention_qkv, then rotary and
    the cache write in the same region -> (h, q (B, nq, d)). Inductor functionalizes the cache write."""
    h, qkv = pre_attention_qkv(h, m, ln, wqkv, bqkv, eps)
    return h, rope_cache_write_ref(qkv, cos, sin, k_cache, v_cache, slots, src_rows, nq, nkv, d)


def post_attention_norm(h: torch.Tensor, a: torch.Tensor, ln: torch.Tensor, eps: float):
    """h + a (the reduced attention output) -> (h, normed input of the MLP)."""
    h = h + a
    return h, rms_norm(h, ln, eps)


def dense_mlp(h: torch.Tensor, a: torch.Tensor, ln: torch.Tensor, gate_up: torch.Tensor, proj: torch.Tensor,
              eps: float):
    """Residual add, RMSNorm and the SwiGLU MLP -> (h, this rank's partial MLP output).
    gate_up: [fc (activated, HF gate_proj); gate (HF up_proj)] stacked, (2I, H): one GEMV reads both."""
    h, x = post_attention_norm(h, a, ln, eps)
    act_in, lin_in = F.linear(x, gate_up).chunk(2, dim=-1)
    return h, F.linear(swiglu(act_in, lin_in), proj)


def final_logits(h: torch.Tensor, m: torch.Tensor, ln_f: torch.Tensor, lm_head: torch.Tensor, eps: float):
    """Last residual add, final norm and this rank's vocab slice of the logits (float32)."""
    return F.linear(rms_norm(h + m, ln_f, eps), lm_head).float()


def moe_mlp(x: torch.Tensor, router: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor, top_k: int,
            renormalize: bool, first_expert: int, grouped: bool = True, rows_kernels=None) -> torch.Tensor:
    """Mixtral MoE on the normed input x (T, H) for this rank's experts [first_expert, + len(fc)).

    fc: (E_local, 2I, H) up then gate; proj: (E_local, H, I). Each (token, choice) pair is sorted by
    expert and run through one grouped GEMM per projection; pairs routed to other ranks weigh 0.
    rows_kernels: runtime.kernels.triton_moe_rows, which runs both projections (SwiGLU fused) when the step has at
    most its MAX_ROWS pairs (decode steps).
    """
    t, e_local = x.shape[0], fc.shape[0]
    probs = F.softmax(F.linear(x.float(), router), dim=-1)
    top_p, top_e = probs.topk(top_k, dim=-1)
    if renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    local = top_e.reshape(-1) - first_expert
    mine = (local >= 0) & (local < e_local)
    local = torch.where(mine, local, torch.zeros_like(local))
    weight = torch.where(mine, top_p.reshape(-1), torch.zeros_like(top_p.reshape(-1)))
    order = torch.argsort(local, stable=True)
    counts = torch.zeros(e_local, dtype=torch.int32, device=x.device).scatter_add_(
        0, local, torch.ones_like(local, dtype=torch.int32))
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[order // top_k]
    if rows_kernels is not None and xs.shape[0] <= rows_kernels.MAX_ROWS:
        y_sorted = rows_kernels.grouped(rows_kernels.grouped_swiglu(xs, fc, offs, t), proj, offs, t)
    else:
        inter = fc.shape[1] // 2
        up, gate = grouped_linear(xs, fc, offs, grouped).split(inter, dim=-1)
        y_sorted = grouped_linear(swiglu(gate, up), proj, offs, grouped)
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
    return (y.view(t, top_k, -1) * weight.view(t, top_k, 1).to(x.dtype)).sum(1)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, grouped: bool = True) -> torch.Tensor:
    """Rows of x in consecutive groups (group g ends at offs[g]) times w[g].T: (N, K) x (G, M, K) -> (N, M)."""
    if grouped and _grouped_mm_supported(x):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    # Fallback (float32/float16 on CUDA): every group over every row, masked. Correct, reads all experts.
    rows = torch.arange(x.shape[0], device=x.device)
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    out = x.new_zeros(x.shape[0], w.shape[1])
    for g in range(w.shape[0]):
        hit = ((rows >= starts[g]) & (rows < offs[g])).to(x.dtype)[:, None]
        out = out + hit * F.linear(x, w[g])
    return out


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    return x.device.type == "cpu" or x.dtype == torch.bfloat16
