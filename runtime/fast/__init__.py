"""The graphed paths: CUDA-graph decode and prefill steps over fused layers."""
