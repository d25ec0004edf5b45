"""Every empirical constant of the planner's step-time model, with where it came from.

Datasheet figures (peak FLOP/s, HBM and link bandwidth) live in builders.planner.hardware's catalogue; this file
holds what a datasheet does not say: achievable fractions, fixed per-kernel costs and collective latencies.
Measurements are on an NVIDIA H200 (141 GB, 4.8 TB/s datasheet HBM3e), torch 2.11, our reference
runtime's CUDA-graph decode path (fused Triton GEMV kernels), Llama-3-8B shape in bf16
(benchmarks/results/runtime-h200-decode-gemv.json, decode-profile-h200.json, gemv-kernels-h200.json,
runtime-h200-x2-tp-gemv.json). The batch-1 step of runtime-h200-decode-gemv.json is the calibration point;
TP=2, batch 32, PP and MoE measurements are independent checks (README "Planner vs measured"). The model is
meant to predict a good engine (TensorRT-LLM): where our runtime is slower, README says so.
"""

from __future__ import annotations

COMPUTE_EFFICIENCY = 0.6
"""Achievable fraction of datasheet tensor-core FLOP/s over a whole compute-bound step (MFU). Not re-fitted:
one 8192^3 bf16 GEMM reached 772.7 / 770.4 TFLOP/s = 0.78 of H200's 989.4 (runtime-h200.json and
runtime-h200-decode-gemv.json hw.matmul_tflops); a full prefill adds attention, norms and smaller GEMMs,
so a step gets less."""

HBM_EFFICIENCY = 0.86
"""Achievable fraction of datasheet HBM bandwidth for the bytes a step streams (weights by GEMV, KV), not
counting each kernel's fixed start/tail cost, which LAYER_FIXED_US carries. Measured: the runtime's fused
Triton GEMV kernels on the eight per-layer projections of Llama-3-8B at tp 1 and 2 (17-235 MB each,
gemv-kernels-h200.json best configs) fit time = 2.85 us + bytes / 4.13 TB/s (residuals <= 1.1 us), and
4.13 TB/s = 0.86 of H200's 4.8; the lm_head (0.5-1.05 GB) alone reaches 4.16-4.32 TB/s. Cross-check in the
step: its 129 GEMVs read 15.01 GB in 3855 us (decode-profile-h200.json) = 3.89 TB/s = 0.81 average, the
per-kernel cost included. Applied to every card as a fraction of its datasheet bandwidth. History: 0.8
(assumed), then 0.725 (a CUDA graph of cuBLAS GEMVs only, 3.48 TB/s, gemv-ceiling-h200.json)."""

LAYER_FIXED_US = 18.4
"""Fixed time per decoder layer per micro-batch step, on top of the byte/FLOP roofline: what does not scale
with bytes. Calibrated on the batch-1 decode step of runtime-h200-decode-gemv.json (decode.fast, fused GEMV
path, CUDA graphs, context 512-768): 4.246 ms minus 15.09 GB streamed (15.01 GB weights + 84 MB KV) at
0.86 x 4.8 TB/s = 3.656 ms, leaves 0.590 ms over 32 layers. Roughly (decode-profile-h200.json, per layer):
four GEMV kernels' fixed 2.85 us each (11.4 us, less the ~3 us/layer the in-graph GEMVs beat the
microbenchmark by), attention beyond streaming its KV (218 us for 32 split-KV calls, ~6 us/layer), graph
gaps between kernels (~160 us per step, 5 us/layer). TP does not shrink it: every rank runs all the layers'
kernels. History: 33.6 us, fitted the same way on the previous cuBLAS + compiled-regions path (5.41 ms step,
runtime-h200.json, against 0.725 of HBM)."""

MULTI_TOKEN_LAYER_FIXED_US = 27.1
"""Fixed time per decoder layer added to a micro-batch of more than one token (batched decode, prefill): such a
step runs GEMMs in place of GEMVs plus separate RMSNorm / SiLU kernels and split-K reductions, each small GEMM
with a tensor-core pipeline's ramp and tail, and its attention reads a batch's KV below streaming speed.
Calibrated on the tp=1 batch-32 decode step of runtime-h200-x2-tp-rows.json (cuBLAS + compiled regions,
context 512-640, 5.677 ms against 4.811 ms without it: 0.866 ms over 32 layers); checked on the same
run's tp=2 and on the Llama-3-70B shape's tp 1 and 2 batch-32 steps (benchmarks/planner_check.py). Seen in
decode-profile-h200-b32.json: per layer, 4 norm / activation kernels (~8 us), 2 split-K reductions (~4 us),
0.52 ms of gaps over the step (~16 us), the GEMMs at 2.2-3.6 TB/s and attention at 3.4 TB/s (the
rest). Before: the batch-1 LAYER_FIXED_US alone, which left tp=2 batch 32 26% under the measurement."""

COLLECTIVE_LATENCY_US: dict[str, float] = {"nvlink": 6.6, "pcie": 10.0, "infiniband": 15.0, "ethernet": 40.0}
"""Fixed latency of one collective or point-to-point operation (kernel start, flags, synchronisation), by the
slowest link it crosses; small decode all-reduces (8 KB at batch 1) cost this, not bandwidth. nvlink: NCCL's
tuning model (src/graph/tuning.cc baseLat, Ring/LL protocol: 6.6 us), confirmed by our runtime's
symmetric-memory one-shot all-reduce, 6.53 us per 8 KB call inside a CUDA graph on 2 x H200 NVLink
(runtime-h200-x2-tp-gemv.json allreduce_micro; NCCL's own all-reduce there: 19.32 us). With the ring's
2(p-1) HOP_LATENCY_US steps the planner charges 7.8 us per TP=2 call, 1.3 us more than the one-shot
(~0.08 ms per TP=2 batch-1 step). pcie, infiniband, ethernet: estimates (host bridges or SHM for PCIe
without P2P, NIC and proxy thread for networks), not measured here."""

HOP_LATENCY_US: dict[str, float] = {"nvlink": 0.6, "pcie": 1.0, "infiniband": 2.7, "ethernet": 15.0}
"""Added latency per ring step (2(p-1) steps per ring all-reduce, one per peer in all-to-all and p2p).
nvlink, pcie, infiniband: NCCL's tuning model hwLat for Ring/LL (NVLink 0.6, PCI 1.0, NET 2.7 us);
ethernet: estimate."""
