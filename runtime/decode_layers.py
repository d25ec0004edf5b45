"""The pieces of one decode step between communication points, as pure functions of tensors.

Each function takes every weight as an argument (nothing closed over), so one `torch.compile` of it
serves all layers: Inductor fuses the residual add into RMSNorm, rotary into the qkv epilogue, and
SiLU * up into one kernel. They use runtime/layers.py's arithmetic, so run eagerly they compute
exactly what RankModel.attention_partial / mlp_partial compute. The MoE block is graph-safe: no
host sync (grouped GEMM over expert-sorted tokens instead of a Python loop over hit experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.layers import apply_rope, rms_norm, swiglu


def pre_attention(h: torch.Tensor, m: torch.Tensor, ln: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, src_rows: torch.Tensor, eps: float, nq: int, nkv: int, d: int):
    """h + m (the previous MLP's output) -> (h, q (B, nq, d) with rotary applied); the rows' K (rotated) and V
    go into the layer's cache (num_blocks, tpb, nkv, d) at `slots`, row src_rows[b] for row b (padding rows
    repeat row 0). Inductor writes the cache in place, fused with the rotary of K."""
    h = h + m
    qkv = F.linear(rms_norm(h, ln, eps), wqkv, bqkv)
    q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    q = apply_rope(q.reshape(-1, nq, d), cos, sin)
    k = apply_rope(k.reshape(-1, nkv, d), cos, sin)
    kf, vf = k_cache.view(-1, nkv, d), v_cache.view(-1, nkv, d)
    kf.index_copy_(0, slots, k.index_select(0, src_rows).to(kf.dtype))
    vf.index_copy_(0, slots, v.reshape(-1, nkv, d).index_select(0, src_rows).to(vf.dtype))
    return h, q


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
            renormalize: bool, first_expert: int, grouped: bool = True) -> torch.Tensor:
    """Mixtral MoE on the normed input x (T, H) for this rank's experts [first_expert, + len(fc)).

    fc: (E_local, 2I, H) up then gate; proj: (E_local, H, I). Each (token, choice) pair is sorted by
    expert and run through one grouped GEMM per projection; pairs routed to other ranks weigh 0.
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
