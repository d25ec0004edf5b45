"""Rank files: byte format, hand-checked slices, one read per source tensor, rerun skipping, killed runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from enginesmith.builders.convert import CheckpointManifest, convert_checkpoint
from enginesmith.builders.convert.memory_gate import MemoryGate
from enginesmith.builders.convert.rank_plan import plan_rank
from enginesmith.builders.convert.rank_writer import write_rank
from enginesmith.builders.convert.safetensors_stream import StreamingFileWriter, write_streaming
from enginesmith.builders.convert.source import HFSource
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec
from tests.support import REPO_ROOT, tiny_hf_model


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def mixtral():
    return tiny_hf_model("mixtral")


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    a, b = torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    entries = [("a", "float32", (3, 4)), ("b", "bfloat16", (2,)), ("c", "int8", (2, 2))]
    c = torch.tensor([[1, -1], [127, -128]], dtype=torch.int8)
    sha = write_streaming(tmp_path / "x.safetensors", entries, [a[:1], a[1:], b, c], {"format": "pt"})
    got = load_file(tmp_path / "x.safetensors")
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b) and torch.equal(got["c"], c)
    import hashlib
    assert sha == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_short_or_failed_write_leaves_no_final_file(tmp_path):
    w = StreamingFileWriter(tmp_path / "r.safetensors", [("a", "float32", (4,))])
    w.write(b"\0" * 8)
    with pytest.raises(ValueError, match="wrote 8 of 16"):
        w.commit()

    def chunks():
        yield torch.zeros(2)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_streaming(tmp_path / "r.safetensors", [("a", "float32", (4,))], chunks())
    assert list(tmp_path.iterdir()) == []


def test_rank_contents_match_hand_slices(tmp_path, llama, mixtral):
    hf = load_file(llama / "model.safetensors")
    out = tmp_path / "llama"
    convert_checkpoint(llama, out, Mapping.create(tp_size=8), ModelSpec.from_pretrained_dir(llama), "float32",
                       progress=False)
    for r in (0, 5, 7):
        t = load_file(out / f"rank{r}.safetensors")
        kv = r * 2 // 8  # duplicated KV head of this rank
        q = hf["model.layers.1.self_attn.q_proj.weight"][r * 8:(r + 1) * 8]
        k = hf["model.layers.1.self_attn.k_proj.weight"][kv * 8:(kv + 1) * 8]
        v = hf["model.layers.1.self_attn.v_proj.weight"][kv * 8:(kv + 1) * 8]
        assert torch.equal(t["transformer.layers.1.attention.qkv.weight"], torch.cat([q, k, v]))
        head = t["lm_head.weight"]  # 315 rows padded to 320: 40 per rank
        real = hf["lm_head.weight"][r * 40:(r + 1) * 40]
        assert torch.equal(head[:len(real)], real) and not head[len(real):].any()
        down = hf["model.layers.2.mlp.down_proj.weight"][:, r * 16:(r + 1) * 16]
        assert torch.equal(t["transformer.layers.2.mlp.proj.weight"], down)

    hf = load_file(mixtral / "model.safetensors")
    out = tmp_path / "mixtral"
    m = Mapping.create(tp_size=4, pp_size=2, moe_ep_size=2)
    convert_checkpoint(mixtral, out, m, ModelSpec.from_pretrained_dir(mixtral), "bfloat16", progress=False)
    t = load_file(out / "rank7.safetensors")  # pp 1, tp 3 -> ep rank 1 (experts 4-7), moe_tp rank 1 (rows 48:96)
    fc, proj = t["transformer.layers.0.mlp.fc.weight"], t["transformer.layers.0.mlp.proj.weight"]
    assert fc.dtype == torch.bfloat16 and fc.shape == (4, 96, 64) and proj.shape == (4, 64, 48)
    for local, e in enumerate(range(4, 8)):
        p = f"model.layers.2.block_sparse_moe.experts.{e}."  # local layer 0 of stage 1 = global layer 2
        assert torch.equal(fc[local, :48], hf[p + "w3.weight"][48:].bfloat16())  # up first
        assert torch.equal(fc[local, 48:], hf[p + "w1.weight"][48:].bfloat16())  # then gate
        assert torch.equal(proj[local], hf[p + "w2.weight"][:, 48:].bfloat16())
    router = t["transformer.layers.0.mlp.router.weight"]
    assert router.dtype == torch.float32 and torch.equal(router, hf["model.layers.2.block_sparse_moe.gate.weight"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype,algo", [("float32", None), ("bfloat16", None), ("float32", "W8A16")])
def test_each_source_tensor_read_at_most_once_per_rank(tmp_path, mixtral, dtype, algo):
    spec = ModelSpec.from_pretrained_dir(mixtral)
    m = Mapping.create(tp_size=4, pp_size=2, moe_ep_size=2)
    for rank in range(m.world_size):
        plans = plan_rank(spec, m, rank, dtype, algo)
        with HFSource(mixtral) as src:
            write_rank(tmp_path / f"rank{rank}.safetensors", plans, src)
            assert src.reads == {s: 1 for p in plans for s in p.sources()}


def test_memory_gate_caps_bytes_in_flight_across_threads():
    gate, lock, seen = MemoryGate(100), threading.Lock(), []

    def worker(n):
        with gate.hold(n):
            with lock:
                seen.append(gate.used)
            time.sleep(0.02)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (60, 50, 40, 30, 250, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(seen) == 6 and max(seen) <= 100 and gate.used == 0  # 250 was clipped to 100 and ran alone
    assert 100 in seen


def stat_ids(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("rank*.safetensors"))}


def test_rerun_skips_matching_ranks_and_rewrites_damaged_or_stale_ones(tmp_path, llama):
    spec, out = ModelSpec.from_pretrained_dir(llama), tmp_path / "ckpt"
    m = Mapping.create(tp_size=2, pp_size=2)
    first = convert_checkpoint(llama, out, m, spec, "float32", progress=False)
    before = stat_ids(out)
    again = convert_checkpoint(llama, out, m, spec, "float32", progress=False)
    assert stat_ids(out) == before and again.outputs == first.outputs and again.key == first.key
    assert CheckpointManifest.read(out).is_complete(out, first.key)

    with open(out / "rank1.safetensors", "r+b") as f:  # flip one data byte
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    convert_checkpoint(llama, out, m, spec, "float32", progress=False)
    after = stat_ids(out)
    assert after["rank1.safetensors"] != before["rank1.safetensors"]
    assert {k: v for k, v in after.items() if k != "rank1.safetensors"} == {
        k: v for k, v in before.items() if k != "rank1.safetensors"}
    assert CheckpointManifest.read(out).is_complete(out, first.key)

    smaller = convert_checkpoint(llama, out, Mapping.create(tp_size=2), spec, "float32", progress=False)
    assert sorted(p.name for p in out.glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]
    assert smaller.key != first.key and smaller.rank_files == ["rank0.safetensors", "rank1.safetensors"]
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["generation_config.json", "tokenizer.json",
                                                                    "tokenizer_config.json"]


KILL_SCRIPT = """
import sys, time
from enginesmith.builders.convert import convert_checkpoint, rank_writer
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import ModelSpec

real = rank_writer.rank_chunks

def stalling(plans, source, *args):
    for i, chunk in enumerate(real(plans, source, *args)):
        yield chunk
        if i == 3 and "rank1" in STATE:
            print("STALLED", flush=True)
            time.sleep(600)

STATE = []
real_write = rank_writer.write_streaming

def tracking(path, *a, **k):
    STATE.append(path.name.split(".")[0])
    return real_write(path, *a, **k)

rank_writer.write_streaming = tracking
rank_writer.rank_chunks = stalling
hf, out = sys.argv[1], sys.argv[2]
convert_checkpoint(hf, out, Mapping.create(tp_size=2, pp_size=2), ModelSpec.from_pretrained_dir(hf), "float32",
                   workers=1, progress=False)
"""


def test_killed_run_leaves_no_truncated_final_file_and_rerun_finishes(tmp_path, llama):
    out = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(llama), str(out)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "STALLED", proc.stderr.read()
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    names = sorted(p.name for p in out.iterdir())
    assert "rank0.safetensors" in names and "rank1.safetensors" not in names
    assert "manifest.json" not in names and "config.json" not in names
    assert any(n.startswith(".rank1.safetensors.") and n.endswith(".tmp") for n in names)  # torn, temp name only
    with safe_open(out / "rank0.safetensors", "pt") as f:  # the finished rank is whole
        assert "transformer.vocab_embedding.weight" in f.keys()
    rank0 = (out / "rank0.safetensors").stat().st_ino

    manifest = convert_checkpoint(llama, out, Mapping.create(tp_size=2, pp_size=2),
                                  ModelSpec.from_pretrained_dir(llama), "float32", progress=False)
    assert (out / "rank0.safetensors").stat().st_ino == rank0  # reused, not rewritten
    assert not list(out.glob(".*.tmp")) and not (out / ".convert-progress.json").exists()
    assert manifest.is_complete(out, manifest.key)


def test_weight_only_for_trtllm_build_keeps_float_weights(tmp_path, llama):
    m = convert_checkpoint(llama, tmp_path, Mapping.create(tp_size=2), ModelSpec.from_pretrained_dir(llama),
                           "float16", "int4_weight_only", progress=False, prequantize=False)
    assert json.loads((tmp_path / "config.json").read_text())["quantization"]["quant_algo"] == "W4A16"
    t = load_file(tmp_path / "rank0.safetensors")
    assert t["transformer.layers.0.attention.qkv.weight"].dtype == torch.float16
    assert not [k for k in t if k.endswith("per_channel_scale")] and m.prequantized is False
    q = convert_checkpoint(llama, tmp_path, Mapping.create(tp_size=2), ModelSpec.from_pretrained_dir(llama),
                           "float16", "int4_weight_only", progress=False)
    assert q.key != m.key and q.prequantized  # a different output, not a cache hit
    assert load_file(tmp_path / "rank0.safetensors")["transformer.layers.0.mlp.fc.weight"].dtype == torch.int8


def test_rerun_writes_nothing_only_when_the_whole_folder_is_this_conversion(tmp_path, llama):
    """Same key and intact files: a no-op. A new plan, a changed tokenizer or a touched config.json (same key)
    still get their files and manifest rewritten, with every rank file reused."""
    import shutil

    from enginesmith.builders.convert import convert

    hf, out = tmp_path / "hf", tmp_path / "ckpt"
    shutil.copytree(llama, hf)
    args = (hf, out, Mapping.create(tp_size=2), ModelSpec.from_pretrained_dir(hf), "float32")
    first = convert(*args, progress=False, plan={"sla": 1})
    assert first.written == ["rank0.safetensors", "rank1.safetensors"] and not first.up_to_date
    again = convert(*args, progress=False, plan={"sla": 1})
    assert again.up_to_date and again.written == [] and again.manifest == first.manifest
    replanned = convert(*args, progress=False, plan={"sla": 2})
    assert not replanned.up_to_date and replanned.written == [] and replanned.manifest.plan == {"sla": 2}
    (hf / "tokenizer_config.json").write_text((hf / "tokenizer_config.json").read_text() + "\n")
    retokenized = convert(*args, progress=False, plan={"sla": 2})
    assert not retokenized.up_to_date and retokenized.written == []
    assert (out / "tokenizer" / "tokenizer_config.json").read_text() == (hf / "tokenizer_config.json").read_text()
    (out / "config.json").write_text("{}")
    repaired = convert(*args, progress=False, plan={"sla": 2})
    assert not repaired.up_to_date and json.loads((out / "config.json").read_text())["mapping"]["tp_size"] == 2
    assert repaired.manifest.key == first.manifest.key and not repaired.manifest.mismatched_outputs(out)
