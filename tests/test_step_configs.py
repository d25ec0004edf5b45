"""benchmarks/kernels/step_configs' variant parsing (the timing itself needs a GPU)."""

import pytest

from benchmarks.kernels.step_configs import parse_variant
from enginesmith.runtime.kernels.triton_gemv import GemvConfig


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
