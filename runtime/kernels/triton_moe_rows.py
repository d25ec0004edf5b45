"""The experts' projections of a multi-token MoE decode step in Triton-lang: grouped GEMMs for a few rows an expert.

runtime/decode_layers.moe_mlp sorts a step's (token, choice) pairs by expert, so expert g owns rows
[offs[g - 1], offs[g]) of the gathered input; each projection is then one grouped GEMM. At decode batch sizes an
expert gets a handful of rows (32 tokens x top-2 over 8 experts: ~8), where PyTorch's grouped GEMM
(torch._grouped_mm, CUTLASS) streamed the Mixtral experts at 2.7 TB/s on an H200, 66% of the copy bandwidth
(decode-profile-h200-moe-b32.json: 8.24 of the 9.47 ms of kernel time a step); these kernels stream them at
4.1-4.35 TB/s (moe-rows-h200.json), and the 8-layer Mixtral's batch-32 step went from 9.66 to 6.44 ms at tp=1
and from 5.64 to 4.00 ms at tp=2 (runtime-h200-x2-tp-mixtral-rows.json). Here program (n, g) owns BLOCK_N
output columns of expert g for all its rows (BLOCK_M at a time, tl.dot on tensor cores) and walks K once, so each
expert's weights stream once, as runtime/kernels/triton_rows.py does for a dense layer; experts no row chose read
nothing.

- `grouped_swiglu`: the fused up/gate projection, fc (G, 2I, K) "up then gate" (runtime/model/model.py) ->
  silu(gate) * up (rows, I), rounded as moe_mlp rounds (each projection, silu, the product);
- `grouped`: (rows, K) x w (G, N, K) -> (rows, N), the down projection.
Used for at most MAX_ROWS routed rows (decode steps); prefill-sized steps keep the grouped GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from enginesmith.runtime.kernels.triton_gemv import _silu_mul, configs_from_env
from enginesmith.runtime.kernels.triton_rows import RowsConfig, k_loop

MAX_ROWS = 512
"""Routed (token, choice) rows up to which moe_mlp takes these kernels (256 tokens at top-2)."""


@triton.jit
def _grouped_rows_kernel(X, W, OFFS, OUT, N, K, stride_g, HALF, SWIGLU: tl.constexpr, EVEN_K: tl.constexpr,
                         IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    start = tl.load(OFFS + g - 1, mask=g > 0, other=0)
    end = tl.load(OFFS + g)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    act_ty = X.dtype.element_ty
    wp = W + g.to(tl.int64) * stride_g + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # W^T tiles
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < end
        xp = X + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
        acc, acc2 = k_loop(xp, wp, K, HALF * K, mask_m, mask_n, offs_k, SWIGLU, EVEN_K, IEEE, BLOCK_M, BLOCK_N,
                           BLOCK_K)  # acc2: the gate rows, HALF below the up rows
        y = acc.to(act_ty).to(tl.float32)
        if SWIGLU:
            y = _silu_mul(acc2.to(act_ty).to(tl.float32), y, act_ty)
        tl.store(OUT + rows.to(tl.int64)[:, None] * N + offs_n[None, :], y.to(OUT.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


DEFAULT = RowsConfig(64, 128, 4, 3)
"""Launch config for shapes the tuned table lacks: within 1.5% of the best on each of the four shapes below."""

TUNED: dict[str, RowsConfig] = {
    "moe-swiglu-14336x4096": RowsConfig(128, 128, 8, 3),  # Mixtral up/gate, tp1: 4.35 TB/s (grouped GEMM 2.53)
    "moe-4096x14336": RowsConfig(64, 256, 4, 3),  # down tp1: 4.25 TB/s (2.88)
    "moe-swiglu-7168x4096": RowsConfig(64, 256, 4, 3),  # up/gate tp2 (moe_tp_size 2): 4.12 TB/s (2.52)
    "moe-4096x7168": RowsConfig(128, 128, 4, 3),  # down tp2: 4.11 TB/s (2.50)
}
"""Best config per `shape_key` from benchmarks/kernels/moe_rows.py on an H200, 32 tokens routed top-2 over 8 experts
(moe-rows-h200.json); ENGINESMITH_MOE_ROWS_CONFIGS names a JSON file of that benchmark whose entries win."""


def shape_key(n: int, k: int, swiglu: bool) -> str:
    return f"moe-{'swiglu-' if swiglu else ''}{n}x{k}"


def config_for(n: int, k: int, swiglu: bool) -> RowsConfig:
    return (TUNED | configs_from_env("ENGINESMITH_MOE_ROWS_CONFIGS", RowsConfig)).get(shape_key(n, k, swiglu),
                                                                                     DEFAULT)


def block_m(max_group_rows: int) -> int:
    """Rows a program takes at once: the most any expert can get (one per token), padded to 16..64."""
    return max(16, min(64, triton.next_power_of_2(max(1, max_group_rows))))


SMEM_BUDGET = 180 * 1024
"""Bytes of shared memory the pipelined tiles may take (Hopper has 227 KB a block, less what the epilogue needs;
on Ada's 99 KB a config that does not fit fails to launch and the step's self-check falls back to the grouped
GEMM)."""


def smem_bytes(cfg: RowsConfig, bm: int, elt: int, swiglu: bool) -> int:
    """Triton's pipelined loads keep num_stages - 1 buffers of the x tile and the weight tile(s). On an H200 every
    config of benchmarks/kernels/moe_rows.py under 227 KB this way launched, every one over it failed."""
    return max(1, cfg.num_stages - 1) * cfg.block_k * (bm + cfg.block_n * (2 if swiglu else 1)) * elt


def fit_smem(cfg: RowsConfig, bm: int, elt: int, swiglu: bool) -> RowsConfig:
    """cfg with fewer pipeline stages (then a shorter BLOCK_K) until its tiles fit SMEM_BUDGET: float32 weights
    (the CPU / test dtype) need twice the room of the bf16 configs tuned on the GPU, 64-row blocks more than the
    32-row blocks they were tuned at."""
    stages, bk = cfg.num_stages, cfg.block_k

    def need(stages: int, bk: int) -> int:
        return smem_bytes(RowsConfig(cfg.block_n, bk, cfg.num_warps, stages), bm, elt, swiglu)

    while need(stages, bk) > SMEM_BUDGET and stages > 1:
        stages -= 1
    while need(stages, bk) > SMEM_BUDGET and bk > 16:
        bk //= 2
    return RowsConfig(cfg.block_n, bk, cfg.num_warps, stages)


def _launch(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, n: int, swiglu: bool, max_group_rows: int,
            config: RowsConfig | None) -> torch.Tensor:
    rows, k = x.shape
    if x.dim() != 2 or w.dim() != 3 or w.shape[2] != k or not w.is_contiguous():
        raise ValueError(f"grouped rows: x {tuple(x.shape)} and weights {tuple(w.shape)} (G, N, K contiguous) "
                         "do not match")
    if offs.shape != (w.shape[0],) or offs.dtype != torch.int32:
        raise ValueError(f"grouped rows: offs must be ({w.shape[0]},) int32 group ends, got {tuple(offs.shape)} "
                         f"{offs.dtype}")
    bm = block_m(max_group_rows)
    cfg = fit_smem(config or config_for(n, k, swiglu), bm, w.element_size(), swiglu)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    _grouped_rows_kernel[(triton.cdiv(n, cfg.block_n), w.shape[0])](
        x.contiguous(), w, offs, out, n, k, w.shape[1] * k, n, SWIGLU=swiglu, EVEN_K=k % cfg.block_k == 0,
        IEEE=w.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def grouped_swiglu(x: torch.Tensor, fc: torch.Tensor, offs: torch.Tensor, max_group_rows: int,
                   config: RowsConfig | None = None) -> torch.Tensor:
    """x (rows, K) sorted by expert (group g ends at offs[g]), fc (G, 2I, K) up then gate -> silu(gate) * up
    (rows, I). max_group_rows: the most rows one expert can have (the step's tokens). config: the launch
    (else `config_for`)."""
    return _launch(x, fc, offs, fc.shape[1] // 2, True, max_group_rows, config)


def grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, max_group_rows: int,
            config: RowsConfig | None = None) -> torch.Tensor:
    """x (rows, K) sorted by expert, w (G, N, K) -> x_g w[g]^T for each group's rows: (rows, N)."""
    return _launch(x, w, offs, w.shape[1], False, max_group_rows, config)
