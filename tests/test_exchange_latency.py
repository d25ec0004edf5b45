"""benchmarks/kernels/exchange_latency.py's arithmetic (the measurement itself needs 2 GPUs: nvidia-h100-x2)."""

import pytest

from benchmarks.kernels.exchange_latency import _per_point


def test_point_costs_are_per_pair_differences_against_the_one_gpu_floor():
    ms = dict(mini_tp1=0.064, mini_tp2=0.256, mini_tp1_seq=0.08, mini_tp2_seq=0.32, gemv_local=1.6,
              gemv_one_shot=1.92, gemv_kernel=1.76, gemv_exchange_seq=2.08, one_shot_alone=0.2)
    got = _per_point(ms, 32)
    assert got["per_pair"]["gemv_local"] == pytest.approx(50.0)  # 1.6 ms over 32 pairs
    assert got["cost"] == pytest.approx(dict(mini_cross_gpu=6.0, mini_cross_gpu_seq=7.5, one_shot_over_local=10.0,
                                             kernel_over_local=5.0, exchange_seq_over_local=15.0))


def test_missing_graphs_give_no_cost_rows():
    assert _per_point(dict(gemv_local=1.0), 10)["cost"] == {}
