"""benchmarks/step_configs' variant parsing (the timing itself needs a GPU)."""

import pytest

from benchmarks.step_configs import parse_variant
from runtime.triton_gemv import GemvConfig


def test_variant_with_overrides():
    name, o = parse_variant("o:4096x2048=pf-n4-k2048-w4,rope-3072x4096=n4-k1024-w8")
    assert name == "o"
    assert o == {"4096x2048": GemvConfig(4, 2048, 4, 1, prefetch=True),
                 "rope-3072x4096": GemvConfig(4, 1024, 8, 1, prefetch=False)}
    assert o["4096x2048"].key() == "pf-n4-k2048-w4-s1"


def test_plain_variant_keeps_the_table():
    assert parse_variant("base") == ("base", {})


@pytest.mark.parametrize("bad", [":4096x2048=pf-n4-k2048-w4", "x:4096x2048", "x:4096x2048=n4", "x:=n4-k64-w4"])
def test_bad_variant_names_the_part(bad):
    with pytest.raises(ValueError, match="variant"):
        parse_variant(bad)


def test_variant_with_l2_tiles_round_trips_the_key():
    _, o = parse_variant("l2:swiglu-7168x4096=pf-n16-k512-w4-l2t2")
    cfg = o["swiglu-7168x4096"]
    assert cfg == GemvConfig(16, 512, 4, 1, prefetch=True, l2_tiles=2) and cfg.key() == "pf-n16-k512-w4-s1-l2t2"
    assert parse_variant(f"again:swiglu-7168x4096={cfg.key()}")[1] == o


def test_star_gives_every_tuned_entry_l2_tiles_but_the_named_ones():
    from runtime import triton_gemv

    _, o = parse_variant("all:4096x2048=n8-k1024-w4,*=l2t1")
    assert set(o) == set(triton_gemv.TUNED)
    assert o["4096x2048"] == GemvConfig(8, 1024, 4, 1)  # named before the star: kept as given
    for key, cfg in triton_gemv.TUNED.items():
        if key != "4096x2048":
            assert o[key].l2_tiles == 1 and o[key].block_n == cfg.block_n and o[key].prefetch == cfg.prefetch
