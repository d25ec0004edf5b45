"""The reference `tensorrt_llm` Python model served by a real tritonserver (bundled in nvidia-pytriton).

One server for the module, serving the converted tiny llama through a minimal repository holding only
the `tensorrt_llm` model (upstream's tensor contract, built by triton_repo.model_config), and the same engine
as `tensorrt_llm_process`, which runs it in a process of its own (engine_process: true). Checks, through
both where marked by `model`: transformers parity over gRPC streaming, gRPC non-streaming, HTTP generate and
generate_stream; 32 concurrent requests equal to one at a time with real batching; cancellation frees the KV
blocks; bad requests get clear errors and the server keeps serving; metrics advance; a killed engine process
stops the server (last: the module's server is gone after it).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from enginesmith.builders.mapping import Mapping
from enginesmith.runtime.engine.iteration_log import read_iteration_log
from tests.served_processes import engine_holder, engine_process, paused
from tests.support import REPO_ROOT, convert_tiny, tiny_hf_model
from tests.test_engine import PROMPTS, write_engine_dir

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]
MODEL = "tensorrt_llm"
PROCESS_MODEL = "tensorrt_llm_process"
"""The same engine, served from a process of its own (parameter engine_process: true)."""
MODELS = [MODEL, PROCESS_MODEL]
MAX_SEQ_LEN = 1024
"""Long enough that a request stopped as soon as the client has seen it generate is far from its end."""
INTERVAL_MODEL = "tensorrt_llm_interval4"
"""The same engine, streamed 4 steps' tokens at a time after the first (parameter stream_interval)."""


def tensorrt_llm_config(engine_dir: Path, name: str = MODEL, **params: str) -> str:
    """The upstream tensorrt_llm config (part A's protobuf builder), backend python, over our engine dir;
    `params`: more parameters (the reference runtime's own: engine_process, iteration_log_path)."""
    from enginesmith.triton_repo import model_config as mc

    options = mc.RepoOptions(triton_max_batch_size=16, decoupled=True, tensorrt_llm_backend="python")
    params = {"gpt_model_path": str(engine_dir), "gpt_model_type": "inflight_fused_batching",
              "batch_scheduler_policy": "guaranteed_no_evict", "cancellation_check_period_ms": "5",
              "exclude_input_in_output": "true", "enable_kv_cache_reuse": "false", "max_beam_width": "1",
              "kv_cache_free_gpu_mem_fraction": "0.9", "max_tokens_in_paged_kv_cache": ""} | params
    cfg = mc.tensorrt_llm_config(options, params)
    cfg.name = name
    return mc.to_pbtxt(cfg)


def add_model(repo: Path, name: str, config_text: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "triton_repo" / "models" / "tensorrt_llm_reference.py", repo / name / "1" / "model.py")
    (repo / name / "config.pbtxt").write_text(config_text)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from enginesmith.triton_repo.server import TritonServer

    root = tmp_path_factory.mktemp("serve")
    engine_dir = write_engine_dir(root / "engine", convert_tiny(root, "llama", Mapping.create(1, 1)),
                                  max_seq_len=MAX_SEQ_LEN)
    logs = {m: root / f"iterations-{m}.jsonl" for m in MODELS}
    add_model(root / "repo", MODEL, tensorrt_llm_config(engine_dir))  # its log: through the environment
    add_model(root / "repo", PROCESS_MODEL, tensorrt_llm_config(engine_dir, PROCESS_MODEL, engine_process="true",
                                                                iteration_log_path=str(logs[PROCESS_MODEL])))
    add_model(root / "repo", INTERVAL_MODEL, tensorrt_llm_config(  # its own log, apart from MODEL's
        engine_dir, INTERVAL_MODEL, stream_interval="4", iteration_log_path=str(root / "iterations-interval.jsonl")))
    env = {"ENGINESMITH_ITERATION_LOG": str(logs[MODEL]), "ENGINESMITH_ENGINE_PROCESS": ""}
    with TritonServer(root / "repo", log_path=root / "server.log", ready_timeout_s=120, env=env) as srv:
        srv.iteration_logs = logs
        yield srv


def tensors(prompt, max_tokens, **extra) -> dict[str, np.ndarray]:
    t = {"input_ids": np.array([prompt], np.int32), "input_lengths": np.array([[len(prompt)]], np.int32),
         "request_output_len": np.array([[max_tokens]], np.int32)}
    for k, v in extra.items():
        t[k] = np.array([[v]], dtype=np.asarray(v).dtype if not isinstance(v, np.ndarray) else v.dtype)
    return t


class Stream:
    """One gRPC bidirectional stream; collects responses per request id until each final one."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def send(self, rid: str, inputs: dict[str, np.ndarray], model: str = MODEL) -> None:
        from enginesmith.client.grpc_stream import infer_inputs

        self.client.async_stream_infer(model, infer_inputs(inputs), request_id=rid, enable_empty_final_response=True)

    def collect(self, n: int, timeout: float = 120) -> dict[str, dict]:
        """Wait for `n` requests to end: id -> {"tokens": [...], "error": str | None, "responses": k (with tokens),
        "empty": k (responses whose output_ids hold no token)}."""
        from enginesmith.client.grpc_stream import is_final

        out: dict[str, dict] = {}
        done = 0
        deadline = time.monotonic() + timeout
        while done < n:
            result, error = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:  # errors of a stream carry no request id: one error ends one request
                out[f"error{done}"] = {"tokens": [], "error": str(error), "responses": 1}
                done += 1
                continue
            rid = result.get_response().id
            entry = out.setdefault(rid, {"tokens": [], "error": None, "responses": 0, "empty": 0})
            names = {o.name for o in result.get_response().outputs}
            if "output_ids" in names:
                ids = result.as_numpy("output_ids")
                assert ids.shape[:2] == (1, 1) and result.as_numpy("sequence_length").shape == (1, 1)
                entry["tokens"] += ids.reshape(-1).tolist()
                entry["responses" if ids.size else "empty"] += 1
                entry.setdefault("chunks", []).extend([ids.size] if ids.size else [])
            done += is_final(result)
        return out

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


@pytest.fixture(scope="module")
def expected(server):
    """transformers greedy generate on the same tiny model (end_id = eos, left out of the output)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = tiny_hf_model("llama")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = []
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        out.append((ids, gen[:-1] if gen[-1] == tok.eos_token_id else gen, tok.eos_token_id))
    return out


def _greedy_12(server, expected, streaming: bool, model: str) -> dict[str, dict]:
    """Every expected prompt as request p<i>, 12 tokens with end_id, on one stream: what Stream.collect returns."""
    s = Stream(server.grpc_url)
    try:
        for i, (ids, _, eos) in enumerate(expected):
            s.send(f"p{i}", tensors(ids, 12, end_id=np.int32(eos), streaming=np.bool_(streaming)), model=model)
        return s.collect(len(expected))
    finally:
        s.close()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("streaming", [True, False])
def test_grpc_greedy_matches_transformers(server, expected, streaming, model):
    got = _greedy_12(server, expected, streaming, model)
    for i, (ids, want, _) in enumerate(expected):
        assert got[f"p{i}"]["error"] is None and got[f"p{i}"]["tokens"] == want, ids
        # streamed: at least one response per step's worth of tokens, several tokens in one where the sender fell
        # behind the engine (tokens stay in order: checked above); not streamed: exactly one
        assert (1 <= got[f"p{i}"]["responses"] <= len(want)) if streaming else got[f"p{i}"]["responses"] == 1
        # a stream that ends at end_id ends with a response of no token (sequence_length 0), as upstream's does
        assert got[f"p{i}"]["empty"] == (streaming and len(want) < 12)


def test_stream_interval_groups_the_tokens_after_the_first(server, expected):
    """stream_interval=4: between a stream's first response and its last, each carries at least 4 tokens (more
    only where the sender fell behind); the tokens are the same as streamed one at a time."""
    got = _greedy_12(server, expected, True, INTERVAL_MODEL)
    for i, (ids, want, _) in enumerate(expected):
        entry = got[f"p{i}"]
        assert entry["error"] is None and entry["tokens"] == want, ids
        chunks = entry["chunks"]
        assert all(n >= 4 for n in chunks[1:-1]), chunks
        assert len(chunks) <= 2 + (len(want) - 1) // 4, chunks


def test_http_generate_and_generate_stream_match_transformers(server, expected):
    for ids, want, eos in expected:
        body = {"input_ids": ids, "input_lengths": [len(ids)], "request_output_len": [12], "end_id": [eos]}
        r = httpx.post(f"{server.http_url}/v2/models/{MODEL}/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == want
        with httpx.stream("POST", f"{server.http_url}/v2/models/{MODEL}/generate_stream",
                          json=body | {"streaming": True}, timeout=60) as resp:
            chunks = [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]
        # generate renders a one-element tensor as a scalar
        assert [t for c in chunks for t in np.atleast_1d(c.get("output_ids", [])).tolist()] == want
        assert 1 <= len([c for c in chunks if np.atleast_1d(c.get("output_ids", [])).size]) <= len(want)


def _mixed(n=32, seed=1):
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        extra = {"streaming": np.bool_(i % 2 == 0)}
        if i % 4 == 1:
            extra |= {"runtime_top_k": np.int32(5), "runtime_top_p": np.float32(0.9), "seed": np.uint64(i),
                      "temperature": np.float32(0.7)}
        specs.append(([rng.randrange(3, 300) for _ in range(rng.randint(1, 40))], rng.randint(1, 24), extra))
    return specs


@pytest.mark.parametrize("model", MODELS)
def test_32_concurrent_requests_equal_one_at_a_time_and_batch(server, model):
    specs = _mixed()
    log = server.iteration_logs[model]
    s = Stream(server.grpc_url)
    try:
        alone = []
        for i, (p, n, extra) in enumerate(specs):
            s.send(f"a{i}", tensors(p, n, **extra), model=model)
            alone.append(s.collect(1)[f"a{i}"]["tokens"])
        first_iter = len(read_iteration_log(log))
        for i, (p, n, extra) in enumerate(specs):
            s.send(f"c{i}", tensors(p, n, **extra), model=model)
        together = s.collect(len(specs))
    finally:
        s.close()
    assert [together[f"c{i}"]["tokens"] for i in range(len(specs))] == alone
    assert [len(a) for a in alone] == [n for _, n, _ in specs]
    iters = read_iteration_log(log)[first_iter:]
    assert max(x.batch_size for x in iters) > 1
    assert any(x.num_context and x.num_generation for x in iters)


def _wait_for_record(log_path: Path, start: int, ok, timeout: float = 30.0):
    """The first iteration record from index `start` on that satisfies `ok` (the log is read as it grows)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next((x for x in read_iteration_log(log_path)[start:] if ok(x)), None)
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no such iteration record after #{start}: {read_iteration_log(log_path)[start:][-3:]}")


def _wait_for_idle_pool(log_path: Path, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = read_iteration_log(log_path)[-1]
        if last.kv_used_blocks == 0 and last.active == 0 and last.queued == 0:
            return last
        time.sleep(0.05)
    raise AssertionError(f"KV pool not released: {read_iteration_log(log_path)[-1]}")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("how", ["grpc_cancel", "stop_request"])
def test_cancelled_stream_frees_its_kv_blocks(server, how, model):
    log = server.iteration_logs[model]
    start = len(read_iteration_log(log))
    s = Stream(server.grpc_url)
    prompt = list(range(3, 19))
    n = MAX_SEQ_LEN - len(prompt)  # the longest run (no end_id before it), the widest window to stop it in
    s.send("victim", tensors(prompt, n, streaming=np.bool_(True), min_tokens=np.int32(n)), model=model)
    result, error = s.events.get(timeout=60)  # it is generating; stop it at once: the engine does not wait for
    assert error is None  # its responses, so a tiny model runs far ahead of what the client has seen
    seen = 1
    busy = _wait_for_record(log, start, lambda x: x.kv_used_blocks > 0)
    with paused(engine_holder(server.proc.pid, model)):  # however loaded the machine, the stop precedes the end
        if how == "grpc_cancel":
            s.close(cancel=True)
        else:
            s.send("victim", tensors([0], 1, stop=np.bool_(True)), model=model)
    if how == "stop_request":
        got = s.collect(2)
        assert got["victim"]["error"] is None and seen + len(got["victim"]["tokens"]) < n  # stopped early
        s.close()
    idle = _wait_for_idle_pool(log)
    assert idle.kv_free_blocks == busy.kv_free_blocks + busy.kv_used_blocks  # back to the starting size
    assert idle.released >= 1
    decodes = sum(x.num_generation for x in read_iteration_log(log)[start:])
    assert decodes < n - 1  # it stopped early instead of running to request_output_len


BAD = [
    ("empty prompt", "tensorrt_llm", dict(prompt=[], max_tokens=4), "input_ids is empty"),
    ("max_tokens 0", "tensorrt_llm", dict(prompt=[5, 6], max_tokens=0),
     "request_output_len=0 is outside [1, 2147483647]"),
    ("beyond max_seq_len", "tensorrt_llm", dict(prompt=[5, 6], max_tokens=1023), "exceed max_seq_len=1024"),
    ("prompt too long", "tensorrt_llm", dict(prompt=[5] * 65, max_tokens=4), "more than max_input_len=64"),
    ("wrong dtype", "tensorrt_llm", dict(prompt=[5, 6], max_tokens=4, dtype=np.int64),
     "is 'INT64', but model 'tensorrt_llm' expects 'INT32'"),
    ("unknown model", "nope", dict(prompt=[5, 6], max_tokens=4), "nope"),
    ("engine process: beyond max_seq_len", PROCESS_MODEL, dict(prompt=[5, 6], max_tokens=1023),
     "exceed max_seq_len=1024"),
    ("engine process: token outside the vocabulary", PROCESS_MODEL, dict(prompt=[5, 10**6], max_tokens=4),
     "input_ids has token id 1000000, outside the vocabulary"),
]


@pytest.mark.parametrize("what,model,spec,message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, what, model, spec, message):
    t = tensors(spec["prompt"], spec["max_tokens"])
    t["input_ids"] = np.array([spec["prompt"]], dtype=spec.get("dtype", np.int32)).reshape(1, -1)
    s = Stream(server.grpc_url)
    try:
        s.send("bad", t, model=model)
        got = next(iter(s.collect(1).values()))
        assert got["error"] is not None and message in got["error"], got
        s.send("good", tensors([5, 6, 7], 3), model=model if model in MODELS else MODEL)
        assert len(s.collect(1)["good"]["tokens"]) == 3
    finally:
        s.close()


@pytest.mark.parametrize("model", MODELS)
def test_batch_of_two_rows_streams_each_row_with_its_batch_index(server, model):
    """One Triton request holding two padded prompts: each row equals the same prompt sent alone."""
    from enginesmith.client.grpc_stream import is_final

    rows = [[11, 12, 13, 14, 15], [21, 22]]
    s = Stream(server.grpc_url)
    try:
        alone = []
        for i, p in enumerate(rows):
            s.send(f"r{i}", tensors(p, 6), model=model)
            alone.append(s.collect(1)[f"r{i}"]["tokens"])
        batch = {"input_ids": np.array([rows[0], rows[1] + [0, 0, 0]], np.int32),
                 "input_lengths": np.array([[5], [2]], np.int32), "request_output_len": np.array([[6], [6]], np.int32),
                 "streaming": np.array([[True], [True]])}
        s.send("both", batch, model=model)
        per_row: dict[int, list[int]] = {0: [], 1: []}
        while True:
            result, error = s.events.get(timeout=60)
            assert error is None
            if result.get_response().outputs:
                per_row[int(result.as_numpy("batch_index").reshape(-1)[0])] += (
                    result.as_numpy("output_ids").reshape(-1).tolist())
            if is_final(result):
                break
    finally:
        s.close()
    assert [per_row[0], per_row[1]] == alone


PERF = {"kv_cache_alloc_new_blocks": np.int32, "kv_cache_reused_blocks": np.int32,
        "kv_cache_alloc_total_blocks": np.int32, "arrival_time_ns": np.int64, "first_scheduled_time_ns": np.int64,
        "first_token_time_ns": np.int64, "last_token_time_ns": np.int64, "acceptance_rate": np.float32,
        "total_accepted_draft_tokens": np.int32, "total_draft_tokens": np.int32}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("streaming", [False, True])
def test_log_probs_and_perf_metrics_are_returned_as_upstream(server, streaming, model):
    """return_perf_metrics gives every output upstream's clients read, each [1, 1]: real KV blocks and
    timings, zeros for speculative decoding (which the reference runtime does not do)."""
    s = Stream(server.grpc_url)
    try:
        s.send("lp", tensors([7, 8, 9], 20, return_log_probs=np.bool_(True), return_perf_metrics=np.bool_(True),
                             streaming=np.bool_(streaming)), model=model)
        s.send("plain", tensors([7, 8, 9], 2, streaming=np.bool_(streaming)), model=model)
        results = {}
        while len(results) < 2 or not all(any(map(is_final_of, r)) for r in results.values()):
            result, error = s.events.get(timeout=60)
            assert error is None
            results.setdefault(result.get_response().id, []).append(result)
    finally:
        s.close()
    last = [r for r in results["lp"] if r.get_response().outputs][-1]
    logp = np.concatenate([r.as_numpy("output_log_probs").reshape(-1) for r in results["lp"]
                           if r.get_response().outputs])
    assert logp.shape == (20,) and np.all(logp <= 0)
    assert last.as_numpy("cum_log_probs").shape == (1, 1)
    assert last.as_numpy("cum_log_probs")[0, 0] == pytest.approx(logp.sum(), rel=1e-5)
    perf = {name: last.as_numpy(name) for name in PERF}
    assert all(a.shape == (1, 1) and a.dtype == PERF[n] for n, a in perf.items()), perf
    t = [int(perf[n][0, 0]) for n in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns",
                                      "last_token_time_ns")]
    assert 0 < t[0] <= t[1] <= t[2] <= t[3]
    blocks = -(-(3 + 20) // 8)  # prompt + output in blocks of tokens_per_block (8)
    assert perf["kv_cache_alloc_total_blocks"][0, 0] == perf["kv_cache_alloc_new_blocks"][0, 0] == blocks
    assert perf["kv_cache_reused_blocks"][0, 0] == 0 and perf["acceptance_rate"][0, 0] == 0.0
    assert perf["total_draft_tokens"][0, 0] == perf["total_accepted_draft_tokens"][0, 0] == 0
    plain = {o.name for r in results["plain"] for o in r.get_response().outputs}
    assert "output_ids" in plain and not plain & set(PERF)  # only when asked for, as upstream


def is_final_of(result) -> bool:
    from enginesmith.client.grpc_stream import is_final

    return is_final(result)


def _gauges(text: str, model: str = MODEL) -> dict[str, float]:
    """'family:category' -> value of `model`'s nv_trt_llm_* gauges and counters in Prometheus text."""
    out = {}
    for m in re.finditer(r"^(nv_trt_llm_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("model") != model:
            continue
        category = next((v for k, v in labels.items() if k not in ("model", "version")), "")
        out[f"{m.group(1)}:{category}"] = float(m.group(3))
    return out


@pytest.mark.parametrize("model", MODELS)
def test_metrics_hook_reports_the_kv_pool_and_iterations(server, model):
    before = _gauges(httpx.get(server.metrics_url, timeout=5).text, model)
    s = Stream(server.grpc_url)
    try:
        s.send("m", tensors([4, 5, 6], 5), model=model)
        assert len(s.collect(1)["m"]["tokens"]) == 5
    finally:
        s.close()
    _wait_for_idle_pool(server.iteration_logs[model])
    deadline, values = time.monotonic() + 10, {}
    while time.monotonic() < deadline:  # gauges are published at most every stats_check_period_ms
        values = _gauges(httpx.get(server.metrics_url, timeout=5).text, model)
        if (values.get("nv_trt_llm_kv_cache_block_metrics:free") == values.get("nv_trt_llm_kv_cache_block_metrics:max")
                and values.get("nv_trt_llm_completed_requests_total:", 0) > before.get(
                    "nv_trt_llm_completed_requests_total:", 0)):
            break
        time.sleep(0.2)
    assert values["nv_trt_llm_kv_cache_block_metrics:max"] > 0
    assert values["nv_trt_llm_kv_cache_block_metrics:free"] == values["nv_trt_llm_kv_cache_block_metrics:max"]
    assert values["nv_trt_llm_general_metrics:iteration_counter"] >= 5
    for counter, grew in (("completed_requests", 1), ("output_tokens", 5), ("input_tokens", 3)):
        name = f"nv_trt_llm_{counter}_total:"
        assert values[name] - before.get(name, 0) == grew, (name, before, values)


def test_killed_engine_process_stops_the_server_with_its_reason(server):
    """Last of the module's server tests: the server is gone after it."""
    engine = engine_process(server.proc.pid, PROCESS_MODEL)
    os.kill(engine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.proc.poll() is not None, "server still running 30 s after its engine process died"
    assert server.failure_reason() == (f"tensorrt_llm (reference): the engine process (pid {engine.pid}) exited "
                                       "with code -9; stopping the server")


# ---- the tensor contract in plain numpy (no server) ----
def _rows(decoupled=True, **extra):
    from enginesmith.runtime.engine.tensor_contract import parse_rows

    return parse_rows(tensors([5, 6, 7], 4, **extra), decoupled=decoupled, exclude_input_default=False)


def test_word_lists_use_upstreams_ids_and_offsets_rows():
    from enginesmith.runtime.engine.request import RequestError
    from enginesmith.runtime.engine.tensor_contract import parse_word_list

    arr = np.array([[10, 11, 12, 13, 0], [2, 3, 4, -1, -1]], np.int32)
    assert parse_word_list(arr) == ((10, 11), (12,), (13,))
    assert parse_word_list(np.zeros((2, 0), np.int32)) == ()
    with pytest.raises(RequestError, match=r"offsets \[3, 2\] do not split"):
        parse_word_list(np.array([[1, 2, 3], [3, 2, -1]], np.int32))


def test_rows_carry_upstream_defaults_and_overrides():
    (row,) = _rows(seed=np.uint64(9), end_id=np.int32(-1), runtime_top_k=np.int32(3),
                   exclude_input_in_output=np.bool_(True))
    assert row.prompt == [5, 6, 7] and row.max_new_tokens == 4 and not row.streaming
    assert row.sampling.seed == 9 and row.sampling.end_id is None and row.sampling.top_k == 3
    assert row.sampling.top_p == 0.0 and row.sampling.temperature == 1.0 and row.exclude_input_in_output
    (legacy,) = _rows(random_seed=np.uint64(4), min_length=np.int32(2))
    assert legacy.sampling.seed == 4 and legacy.sampling.min_tokens == 2


@pytest.mark.parametrize("extra,decoupled,message", [
    ({"streaming": np.bool_(True)}, False, "streaming=true requires the tensorrt_llm model to be decoupled"),
    ({"beam_width": np.int32(2)}, True, "beam_width=2: the reference runtime supports 1 only"),
    ({"lora_task_id": np.uint64(1)}, True, "lora_task_id is not supported"),
    ({"return_context_logits": np.bool_(True)}, True, "return_context_logits=true is not supported"),
    ({"input_lengths": np.int32(9)}, True, "input_lengths=9 is outside [0, 3]"),
])
def test_contract_errors_name_the_input(extra, decoupled, message):
    from enginesmith.runtime.engine.request import RequestError

    with pytest.raises(RequestError, match=message.replace("[", r"\[")):
        _rows(decoupled=decoupled, **extra)
