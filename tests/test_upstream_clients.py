"""Upstream's example clients (tests/data/upstream-clients, byte for byte from tensorrtllm_backend) run unmodified,
as subprocesses, against the served tiny model: end_to_end_grpc_client.py on the ensemble and the BLS,
inflight_batcher_llm_client.py on tensorrt_llm. Their exit code is 0 and the outputs they print are the model's.
The streaming deployment is decoupled; the clients' unary mode runs against the same engine deployed without
streaming (serve.decoupled: false), as upstream serves it.

The expected text is what tensorrt_llm generates greedily for the same token ids (the clients send temperature 1
and no top-k / top-p, which is greedy decoding; end_id is the tokenizer's eos, as the preprocessing model or the
client sets it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from enginesmith.client.grpc_stream import GrpcStreamClient
from enginesmith.client.params import GenerateParams
from enginesmith.client.server_stats import metric_total
from tests.support import REPO_ROOT
from tests.test_client_served import _wait_until_idle

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]
CLIENTS = REPO_ROOT / "tests" / "data" / "upstream-clients"
PROMPT = "The quick brown fox jumps over the lazy dog."
PROMPTS = [PROMPT, "Paris is the capital of France."]
N = 16
PERF_NAMES = ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks",
              "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
              "acceptance_rate", "total_accepted_draft_tokens", "total_draft_tokens")


def run_client(name: str, *args: str) -> str:
    """Run an upstream client to completion; returns its stdout (the test fails on a non-zero exit)."""
    proc = subprocess.run([sys.executable, str(CLIENTS / name), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "Received an error from server" not in proc.stdout, proc.stdout  # it prints errors and goes on
    return proc.stdout


@pytest.fixture(scope="module")
def greedy(served, tok):
    """prompt -> the token ids tensorrt_llm generates for it (greedy, end_id = eos)."""
    out = {}
    with GrpcStreamClient(served.grpc_url, "tensorrt_llm", tok) as c:
        for text in PROMPTS:
            out[text] = c.generate(GenerateParams(text=text, max_tokens=N)).token_ids
    return out


@pytest.fixture(scope="module")
def unary(served):
    """The served engine deployed without streaming: every model of the repository is non-decoupled, so
    inflight_batcher_llm_client.py without --streaming sends unary gRPC requests, as against upstream's."""
    from enginesmith.triton_repo.repository import write_repo
    from enginesmith.triton_repo.server import TritonServer

    recipe = served.recipe.model_copy(update={"serve": served.recipe.serve.model_copy(update={"decoupled": False})})
    root = served.root / "unary"
    write_repo(recipe, served.plan, served.root / "engine", served.tokenizer_dir, root / "repo", streaming=False)
    with TritonServer(root / "repo", log_path=root / "server.log") as server:
        yield server


def completion(tok, greedy, prompt: str) -> str:
    return tok.decode(greedy[prompt], skip_special_tokens=True)


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("streaming", [False, True])
def test_end_to_end_client_checks_its_outputs_and_reads_perf_metrics(served, tok, greedy, model, streaming):
    """--check-outputs: the client itself asserts the text (prompt + completion when not streaming, as upstream's
    model returns the input unless exclude_input_in_output); --return-perf-metrics reads all ten outputs, [1, 1]."""
    want = completion(tok, greedy, PROMPT)
    out = run_client("end_to_end_grpc_client.py", "-u", served.grpc_url, "--model-name", model, "-p", PROMPT,
                     "-o", str(N), *(["--streaming"] if streaming else []), "--return-perf-metrics",
                     "--check-outputs", "--expected-outputs", json.dumps([want]))
    for name in PERF_NAMES:
        assert re.search(rf"^{name}: \S+$", out, re.M), (name, out)
    assert int(re.findall(r"^kv_cache_alloc_total_blocks: (\d+)$", out, re.M)[-1]) >= 1


def test_end_to_end_client_batch_inputs_and_log_probs(served, tok, greedy):
    """Two prompts in one batched request; each response's batch_index puts its text in place."""
    want = [completion(tok, greedy, p) for p in PROMPTS]
    for streaming in ([], ["--streaming"]):
        out = run_client("end_to_end_grpc_client.py", "-u", served.grpc_url, "-p", json.dumps(PROMPTS),
                         "--batch-inputs", "-o", str(N), *streaming, "--return-log-probs", "--check-outputs",
                         "--expected-outputs", json.dumps(want))
        assert "output_log_probs.shape: (1, 1, " in out, out


def test_end_to_end_client_stop_and_bad_words(served, tok, greedy):
    ids = greedy[PROMPT]
    # a generated token whose text the preprocessing model encodes back to exactly it (a usable stop word)
    i, stop = next((i, t) for i, t in enumerate(ids) if tok.encode(w := tok.decode([t]), add_special_tokens=False)
                   == [t] and w.strip() and not w.startswith("-"))
    stopped = tok.decode(ids[:ids.index(stop) + 1], skip_special_tokens=True)
    run_client("end_to_end_grpc_client.py", "-u", served.grpc_url, "-p", PROMPT, "-o", str(N), "--streaming",
               "--stop-words", tok.decode([stop]), "--check-outputs", "--expected-outputs", json.dumps([stopped]))
    with GrpcStreamClient(served.grpc_url, "tensorrt_llm", tok) as c:
        banned = c.generate(GenerateParams(text=PROMPT, max_tokens=N, bad_words=[tok.decode([stop])])).token_ids
    assert stop not in banned
    run_client("end_to_end_grpc_client.py", "-u", served.grpc_url, "--model-name", "tensorrt_llm_bls",
               "-p", PROMPT, "-o", str(N), "--bad-words", tok.decode([stop]), "--exclude-input-in-output",
               "--check-outputs", "--expected-outputs", json.dumps([tok.decode(banned, skip_special_tokens=True)]))


def _csv(tmp_path, ids: list[int]) -> str:
    path = tmp_path / "expected.csv"
    path.write_text(",".join(map(str, ids)) + "\n")
    return str(path)


def test_inflight_batcher_client_streaming_checks_the_output_ids(served, tok, greedy, tmp_path):
    """--check-output compares prompt + streamed ids with the expected ids; perf metrics are printed [1, 1]."""
    expected = tok.encode(PROMPT) + greedy[PROMPT]
    out = run_client("inflight_batcher_llm_client.py", "-u", served.grpc_url, "--tokenizer-dir",
                     str(served.tokenizer_dir), "--text", PROMPT, "--request-output-len", str(N), "--streaming",
                     "--check-output", "--output-tokens-csv", _csv(tmp_path, expected), "--return-perf-metrics")
    assert "PASS!" in out, out
    for name in PERF_NAMES:
        assert re.search(rf"^{name}: \S+$", out, re.M), (name, out)


def test_inflight_batcher_client_without_streaming(served, tok, greedy, tmp_path):
    """Without --streaming the client uses unary gRPC, which Triton refuses for a decoupled model (the served
    tensorrt_llm is decoupled, as upstream's streaming setup); --num-return-sequences 1 sends the same
    non-streamed request over the stream, the closest valid run."""
    out = run_client("inflight_batcher_llm_client.py", "-u", served.grpc_url, "--tokenizer-dir",
                     str(served.tokenizer_dir), "--text", PROMPT, "--request-output-len", str(N),
                     "--num-return-sequences", "1", "--exclude-input-in-output", "--check-output",
                     "--output-tokens-csv", _csv(tmp_path, greedy[PROMPT]))
    assert "PASS!" in out, out


STOPS = [["--request-id", "stop-me"], ["--stop-via-request-cancel"]]


@pytest.mark.parametrize("how", STOPS)
def test_inflight_batcher_client_stops_a_request_early(served, how):
    """--stop-after-ms: a stop request with the same id, or gRPC cancellation; the client itself asserts that
    fewer than --request-output-len tokens came back, and the runtime stopped generating them."""
    _stop_early(served.server, served.tokenizer_dir, how, ["--streaming"])


def test_inflight_batcher_client_unary_checks_the_output_ids(unary, served, greedy, tmp_path):
    """Without --streaming: one unary gRPC request and its one response, compared id for id; perf metrics too."""
    out = run_client("inflight_batcher_llm_client.py", "-u", unary.grpc_url, "--tokenizer-dir",
                     str(served.tokenizer_dir), "--text", PROMPT, "--request-output-len", str(N),
                     "--exclude-input-in-output", "--check-output", "--output-tokens-csv",
                     _csv(tmp_path, greedy[PROMPT]), "--return-perf-metrics")
    assert "PASS!" in out, out
    for name in PERF_NAMES:
        assert re.search(rf"^{name}: \S+$", out, re.M), (name, out)


@pytest.mark.parametrize("how", STOPS)
def test_inflight_batcher_client_unary_stops_a_request_early(unary, served, how):
    _stop_early(unary, served.tokenizer_dir, how, [])


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_end_to_end_client_on_the_deployment_without_streaming(unary, tok, greedy, model):
    want = completion(tok, greedy, PROMPT)
    out = run_client("end_to_end_grpc_client.py", "-u", unary.grpc_url, "--model-name", model, "-p", PROMPT,
                     "-o", str(N), "--return-perf-metrics", "--check-outputs", "--expected-outputs", json.dumps([want]))
    assert int(re.findall(r"^kv_cache_alloc_total_blocks: (\d+)$", out, re.M)[-1]) >= 1


def _stop_early(server, tokenizer_dir, how: list[str], streaming: list[str]) -> None:
    before = metric_total(httpx.get(server.metrics_url).text, "nv_trt_llm_output_tokens_total", "tensorrt_llm")
    n = 470  # with the prompt's 34 tokens, within max_seq_len 512; the stop follows 50 ms after the request
    out = run_client("inflight_batcher_llm_client.py", "-u", server.grpc_url, "--tokenizer-dir", str(tokenizer_dir),
                     "--text", PROMPT, "--request-output-len", str(n), *streaming, "--stop-after-ms", "50", *how)
    assert "Output sequence: " in out, out
    assert _wait_until_idle(server, before) < n  # stopped on the server, not only on the client
