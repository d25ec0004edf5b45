"""Cache keys of the trtllm-engine target: per-rank keys, so only what changed is rebuilt (pure functions)."""

from __future__ import annotations

from enginesmith.builders.build.cache import EngineManifest, changed_factors, rank_keys, stale_ranks
from enginesmith.builders.manifest import sha256_file

COMMON = {"target": "trtllm-engine", "checkpoint_config": "c0", "build_options": {"max_batch_size": "64"},
          "tensorrt_llm": "1.2.1", "gpu_arch": "9.0"}
CKPT = {f"rank{r}.safetensors": f"sha-{r}" for r in range(4)}


def _built(tmp_path, keys: dict[str, str]) -> EngineManifest:
    """An engine dir whose manifest records `keys` and intact rank files."""
    outputs = {}
    for r in keys:
        p = tmp_path / f"rank{r}.engine"
        p.write_bytes(f"engine {r}".encode())
        outputs[p.name] = sha256_file(p)
    return EngineManifest(target="trtllm-engine", key="k", factors=COMMON, rank_keys=keys, outputs=outputs)


def test_every_rank_has_its_own_key():
    keys = rank_keys(COMMON, CKPT, range(4))
    assert len(set(keys.values())) == 4


def test_same_inputs_nothing_stale(tmp_path):
    keys = rank_keys(COMMON, CKPT, range(4))
    assert stale_ranks(_built(tmp_path, keys), keys, tmp_path) == []


def test_one_rank_file_changed_only_that_rank_is_stale(tmp_path):
    old = _built(tmp_path, rank_keys(COMMON, CKPT, range(4)))
    new = rank_keys(COMMON, {**CKPT, "rank2.safetensors": "sha-2-reconverted"}, range(4))
    assert stale_ranks(old, new, tmp_path) == [2]


def test_build_option_changed_every_rank_is_stale(tmp_path):
    old = _built(tmp_path, rank_keys(COMMON, CKPT, range(4)))
    changed = {**COMMON, "build_options": {"max_batch_size": "128"}}
    assert stale_ranks(old, rank_keys(changed, CKPT, range(4)), tmp_path) == [0, 1, 2, 3]
    assert changed_factors(old, changed) == ["build_options"]


def test_tool_version_and_gpu_arch_are_factors(tmp_path):
    old = _built(tmp_path, rank_keys(COMMON, CKPT, range(2)))
    for factor, value in (("tensorrt_llm", "1.2.0"), ("gpu_arch", "8.0")):
        new = rank_keys({**COMMON, factor: value}, CKPT, range(2))
        assert stale_ranks(old, new, tmp_path) == [0, 1], factor


def test_missing_or_altered_engine_file_is_stale(tmp_path):
    keys = rank_keys(COMMON, CKPT, range(3))
    old = _built(tmp_path, keys)
    (tmp_path / "rank0.engine").unlink()
    (tmp_path / "rank1.engine").write_bytes(b"truncated")
    assert stale_ranks(old, keys, tmp_path) == [0, 1]
    assert stale_ranks(old, keys, tmp_path, check_hash=False) == [0]


def test_previous_build_of_another_target_rebuilds_all(tmp_path):
    keys = rank_keys(COMMON, CKPT, range(2))
    other = EngineManifest(target="reference", key="k")
    assert stale_ranks(other, keys, tmp_path) == [0, 1]
    assert stale_ranks(None, keys, tmp_path) == [0, 1]
