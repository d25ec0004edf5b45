"""benchmarks/kernels/profile_decode's timeline arithmetic on made-up kernel events (no profiler, no GPU)."""

from types import SimpleNamespace

from benchmarks.kernels.profile_decode import _layer_report, _layer_slots, _timeline


def _ev(name: str, start: float, end: float):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))


def _steps(layers: int, steps: int, pattern: list[tuple[str, float, float]]) -> list:
    """`steps` steps of: an embedding kernel, `layers` copies of pattern (name, gap before, duration), lm_head;
    100 us of host turn between steps."""
    out, t = [], 0.0
    for _ in range(steps):
        out.append(_ev("embed", t, t + 2.0))
        t += 2.0
        for _ in range(layers):
            for name, gap, dur in pattern:
                out.append(_ev(name, t + gap, t + gap + dur))
                t += gap + dur
        out.append(_ev("gemv", t + 1.0, t + 30.0))
        t += 130.0
    return out


def test_layer_slots_recover_the_per_layer_pattern():
    pattern = [("gemv", 1.0, 9.0), ("attn", 0.5, 6.0), ("gemv", -0.5, 7.0), ("reduce", 2.0, 3.0),
               ("gemv", 1.5, 30.0), ("gemv", 1.0, 16.0), ("reduce", 2.0, 3.5)]
    slots = _layer_slots(_steps(4, 3, pattern), 3, 4)
    assert [s["name"] for s in slots] == [n for n, _, _ in pattern]
    for s, (_, gap, dur) in zip(slots, pattern, strict=True):
        assert abs(s["us"] - dur) < 1e-9 and abs(s["gap_before_us"] - gap) < 1e-9


def test_layer_slots_without_a_repeat_is_empty():
    events = [_ev(f"k{i}", i * 3.0, i * 3.0 + 2.0) for i in range(20)]
    assert _layer_slots(events, 1, 4) == []


def test_timeline_splits_steps_at_the_host_turns():
    pattern = [("gemv", 1.0, 9.0), ("attn", 1.0, 6.0)]
    t = _timeline(_steps(2, 3, pattern), 3)
    busy = 2.0 + 2 * 15.0 + 29.0
    assert abs(t["step_busy_us"] - busy) < 1e-9
    assert abs(t["step_gaps_us"] - (2 * 2.0 + 1.0)) < 1e-9
    assert abs(t["host_turn_us"] - 100.0) < 1e-9


def test_layer_slots_take_a_step_of_the_common_length():
    """A first step cut short (profiler start-up) must not hide the pattern."""
    pattern = [("gemv", 1.0, 9.0), ("attn", 0.5, 6.0)]
    events = _steps(4, 4, pattern)[3:]
    slots = _layer_slots(events, 4, 4)
    assert [(s["name"], s["us"]) for s in slots] == [("gemv", 9.0), ("attn", 6.0)]


def test_layer_report_lists_a_step_when_no_pattern_repeats():
    events = [_ev(f"k{i % 7}", i * 3.0 + (200.0 if i >= 7 else 0.0), i * 3.0 + 2.0 + (200.0 if i >= 7 else 0.0))
              for i in range(14)]
    rep = _layer_report(events, 2, 4)
    assert rep["layer_slots"] == [] and rep["step_kernels"] == [f"k{i}" for i in range(7)]


def test_layer_slots_median_ignores_a_wait_once_a_step():
    """A rank that starts the step early waits once, at the first layer's all-reduce: that lifts the slot's
    mean by wait / layers, not its median."""
    pattern = [("gemv", 1.0, 9.0), ("reduce", 0.5, 3.0)]
    events, layers, wait = _steps(4, 3, pattern), 4, 40.0
    stretched = []
    for i, e in enumerate(events):
        first_reduce_of_step = e.name == "reduce" and i >= 2 and events[i - 2].name == "embed"
        shift = sum(wait for x in stretched if x)  # later events move by the waits before them
        stretched.append(first_reduce_of_step)
        end = e.time_range.end + shift + (wait if first_reduce_of_step else 0.0)
        events[i] = _ev(e.name, e.time_range.start + shift, end)
    slots = _layer_slots(events, 3, layers)
    reduce = next(s for s in slots if s["name"] == "reduce")
    assert abs(reduce["us"] - (3.0 + wait / layers)) < 1e-9
    assert abs(reduce["us_median"] - 3.0) < 1e-9
    assert abs(slots[0]["us_median"] - 9.0) < 1e-9
