"""benchmarks.planner_check on the committed H200 and H100 results: the constants reproduce their calibration point,
baselines and kernels are labelled, every other row is a check with its error computed from both numbers."""

from __future__ import annotations

import json

import pytest

from benchmarks.planner_check import CALIBRATION, MULTI_TOKEN_CALIBRATION, RESULTS, compare, main
from enginesmith.builders.planner.perf_constants import COLLECTIVE_LATENCY_US, HOP_LATENCY_US


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return compare(RESULTS)


def test_the_calibration_rows_are_reproduced_by_the_constants(rows):
    calib = [r for r in rows if r["role"] == "calibration"]
    assert [r["source"].split(" ")[0] for r in calib] == [CALIBRATION[0], MULTI_TOKEN_CALIBRATION[0]]
    measured = json.loads((RESULTS / CALIBRATION[0]).read_text())["decode"]["fast"]["ms_per_token"]
    assert calib[0]["measured"] == measured
    assert abs(calib[0]["error"]) < 0.01  # HBM_EFFICIENCY and LAYER_FIXED_US were fitted on this step
    file, tp, key = MULTI_TOKEN_CALIBRATION
    assert calib[1]["measured"] == json.loads((RESULTS / file).read_text())["tp"][tp][key]["ms_per_step"]
    assert "batch 32" in calib[1]["what"] and abs(calib[1]["error"]) < 0.01  # MULTI_TOKEN_LAYER_FIXED_US's step


def test_rows_label_kernels_and_baselines_and_compute_errors(rows):
    new = [r for r in rows if r["source"].startswith("runtime-h200-x2-tp-gemv.json")]
    whats = {r["what"] for r in new}
    assert {"decode step, tp=2, batch 1, fused GEMV kernels", "decode step, tp=2, batch 1, cuBLAS + compiled regions",
            "decode step, tp=1, batch 32, cuBLAS + compiled regions"} <= whats
    for r in rows:
        assert r["error"] == pytest.approx((r["predicted"] - r["measured"]) / r["measured"])
        assert r["within_target"] == (abs(r["error"]) <= r["target"])
    fast = next(r for r in new if r["what"] == "decode step, tp=2, batch 1, fused GEMV kernels")
    base = next(r for r in new if r["what"] == "decode step, tp=2, batch 1, cuBLAS + compiled regions")
    assert fast["predicted"] == base["predicted"] and fast["measured"] < base["measured"]


def test_allreduce_row_prices_one_ring_all_reduce_of_8kb(rows):
    ar = next(r for r in rows if r["what"].startswith("all-reduce 8 KB") and "one-shot" in r["what"])
    latency = COLLECTIVE_LATENCY_US["nvlink"] + 2 * HOP_LATENCY_US["nvlink"]  # p=2: 2(p-1) ring steps
    assert ar["predicted"] == pytest.approx(latency + 8192 / 450e9 * 1e6)


def test_main_prints_and_writes_the_table_only_when_asked(tmp_path, monkeypatch, capsys):
    for name in ("runtime-h200-decode-gemv.json", "runtime-h200-x2-tp-gemv.json"):
        (tmp_path / name).write_text((RESULTS / name).read_text())
    monkeypatch.setattr("sys.argv", ["planner_check", "--results", str(tmp_path)])
    main()
    assert "calibration" in capsys.readouterr().out
    assert not (tmp_path / "planner-vs-measured.json").exists()  # a plain run leaves the tracked file alone
    monkeypatch.setattr("sys.argv", ["planner_check", "--results", str(tmp_path), "--write"])
    main()
    written = json.loads((tmp_path / "planner-vs-measured.json").read_text())
    assert written == compare(tmp_path) and len(written) > 5
    assert "wrote" in capsys.readouterr().out


def test_device_fed_rows_are_labelled_and_superseded_baselines_skipped(rows):
    fed = [r for r in rows if r["source"].startswith("runtime-h200-x2-tp-device-fed.json")]
    assert fed and all(r["what"].endswith("token fed on the GPU") for r in fed if r["what"].startswith("decode"))
    assert not any("TP exchange" in r["what"] for r in fed)  # its first v5 form: SUPERSEDED_BASELINES
    h100 = [r for r in rows if r["source"].startswith("runtime-h100-x2-tp-exchange-v5.json")]
    assert any("TP exchange" in r["what"] for r in h100) and "H100" in h100[0]["source"]
    older = [r for r in rows if r["source"].startswith("runtime-h200-x2-tp-gemv.json")]
    assert not any("token fed on the GPU" in r["what"] for r in older)  # host-synced runs keep their labels


def test_tp_rows_of_a_mixtral_run_are_planned_for_that_shape():
    """A tp section run with --tp-shape mixtral-8x7b is compared with the plan of the 8-layer Mixtral (MoE weights
    and top-2 expert reads), not with Llama-3-8B's."""
    from benchmarks.planner_check import _tp_rows

    data = {"model": {"shape": "mixtral-8x7b", "layers": 8},
            "tp1": {"1": {"ms_per_step": 3.0, "status": {"gemv": "fused GEMV kernels, PDL on"}}},
            "tp2": {"1": {"ms_per_step": 2.0, "status": {"gemv": "fused GEMV kernels, PDL on"}}}}
    moe = _tp_rows("H200", data, "runtime-h200-x2-tp-moe.json (tp)")
    llama = _tp_rows("H200", data | {"model": {"shape": "llama-3-8b", "layers": 32}}, "x.json (tp)")
    assert [r["what"] for r in moe] == ["decode step, Mixtral-8x7B, 8 layers, tp=1, batch 1, fused GEMV + PDL",
                                        "decode step, Mixtral-8x7B, 8 layers, tp=2, batch 1, fused GEMV + PDL"]
    assert moe[0]["predicted"] != llama[0]["predicted"] and moe[0]["predicted"] > moe[1]["predicted"]
