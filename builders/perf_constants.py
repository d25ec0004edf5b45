"""Every empirical constant of the planner's step-time model, with where it came from.

Datasheet figures (peak FLOP/s, HBM and link bandwidth) live in builders.hardware's catalogue; this file
holds what a datasheet does not say: achievable fractions, fixed per-kernel costs and collective latencies.
Measurements are on an NVIDIA H200 (141 GB, 4.8 TB/s datasheet HBM3e), torch 2.11, our reference
runtime's CUDA-graph decode path, Llama-3-8B shape in bf16 (benchmarks/results/runtime-h200.json,
runtime-h200-x2-tp-pp.json, gemv-ceiling-h200.json). The model is meant to predict a good engine
(TensorRT-LLM): where our runtime is slower than these figures, README's "Planner vs measured" says so.
"""

from __future__ import annotations

COMPUTE_EFFICIENCY = 0.6
"""Achievable fraction of datasheet tensor-core FLOP/s over a whole compute-bound step (MFU). Not re-fitted:
one 8192^3 bf16 GEMM reached 772.7 TFLOP/s = 0.78 of H200's 989.4 (runtime-h200.json hw.matmul_tflops);
a full prefill adds attention, norms and smaller GEMMs, so a step gets less."""

HBM_EFFICIENCY = 0.725
"""Achievable fraction of datasheet HBM bandwidth when a step streams weights (GEMV-shaped reads) and KV.
Measured: a CUDA graph of only the weight GEMVs of one Llama-3-8B bf16 decode step (fused gate/up, as the
runtime and TensorRT-LLM run it) read 15.01 GB in 4.31 ms = 3.48 TB/s = 0.726 of H200's 4.8 TB/s
(gemv-ceiling-h200.json fused_gate_up; separate gate/up: 3.34 TB/s). A plain 2 GiB device copy reached
4.20 TB/s (0.875), so GEMVs, not the memory, set this ceiling. Applied to every card as a fraction of its
datasheet bandwidth (was a flat 0.8 before this measurement)."""

LAYER_FIXED_US = 33.6
"""Fixed time per decoder layer per micro-batch step, on top of the byte/FLOP roofline: the small kernels a
layer runs besides its GEMMs (2 x RMSNorm + residual, rotary + KV write, attention, SwiGLU) each take a few
microseconds whatever the batch, and a CUDA graph removes launch gaps but not these minimum kernel times.
Measured on H200: batch-1 decode step 5.41 ms (runtime-h200.json decode.fast, CUDA graphs) minus the
GEMV-only graph 4.31 ms minus the KV read (84 MB at 3.48 TB/s = 0.02 ms) = 1.08 ms over 32 layers."""

COLLECTIVE_LATENCY_US: dict[str, float] = {"nvlink": 6.6, "pcie": 10.0, "infiniband": 15.0, "ethernet": 40.0}
"""Fixed latency of one collective or point-to-point operation (kernel start, flags, synchronisation), by the
slowest link it crosses; small decode all-reduces (8 KB at batch 1) cost this, not bandwidth. nvlink: NCCL's
tuning model (src/graph/tuning.cc baseLat, Ring/LL protocol: 6.6 us). pcie, infiniband, ethernet: estimates
(host bridges or SHM for PCIe without P2P, NIC and proxy thread for networks), not measured here. Our runtime's
NCCL all-reduce inside a CUDA graph on H200 NVLink costs about 21 us (TP=2 batch-1 decode 4.46 ms minus weights
and fixed layer time, over 65 collectives): a custom one-shot all-reduce, as TensorRT-LLM uses, gets close to
this figure."""

HOP_LATENCY_US: dict[str, float] = {"nvlink": 0.6, "pcie": 1.0, "infiniband": 2.7, "ethernet": 15.0}
"""Added latency per ring step (2(p-1) steps per ring all-reduce, one per peer in all-to-all and p2p).
nvlink, pcie, infiniband: NCCL's tuning model hwLat for Ring/LL (NVLink 0.6, PCI 1.0, NET 2.7 us);
ethernet: estimate."""
