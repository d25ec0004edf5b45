"""benchmarks/served_step.py on the CPU: the engine in process and as served, step by step.

Only what must hold anywhere is checked (both ways generate the same tokens, the serving side mirrors them, the
sections are measured, the served way's step message is counted); the times are what the benchmark reports.
"""

from __future__ import annotations

import json

from benchmarks.served_step import SECTIONS, main


def test_both_ways_generate_the_same_tokens_and_report_each_section(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINESMITH_FAST_DECODE", "on")
    out = tmp_path / "r.json"
    res = main(["--rows", "6", "--isl", "8", "--osl", "6", "--repeats", "1", "--work", str(tmp_path / "w"),
                "--out", str(out)])
    assert json.loads(out.read_text())["medians"] == res["medians"]
    m = res["medians"]
    assert m["outputs_match"] is True
    (a,), (b,) = res["runs"]["in_process"], res["runs"]["served"]
    assert a["decode_steps"] == b["decode_steps"] == 5  # 6 tokens: the first comes with the prompt
    assert set(a["sections_ms"]) == set(b["sections_ms"]) == set(SECTIONS)
    assert a["sections_ms"]["step message"] == 0 < b["sections_ms"]["step message"]
    assert a["sections_ms"]["plan"] > 0 and b["sections_ms"]["model"] > 0  # the fast decode path ran
    assert b["serving_side_us_per_message"] > 0 and "serving_side_us_per_message" not in a
