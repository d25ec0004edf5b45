"""Client round trips against the real served tiny model: gRPC streaming, HTTP generate and generate_stream,
the tensorrt_llm model with token ids, sampling parameters, stop/bad words, request ids, Ctrl-C cancellation."""

from __future__ import annotations

import time

import httpx
import pytest

from enginesmith.client.grpc_stream import GrpcStreamClient
from enginesmith.client.grpc_unary import grpc_generate
from enginesmith.client.http import HttpClient
from enginesmith.client.params import ClientError, GenerateParams
from enginesmith.client.server_stats import metric_total, metrics_sample

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]
PROMPT = "The quick brown fox jumps over the lazy dog."


def greedy_ids(served, tok, n=10, **kw) -> list[int]:
    with GrpcStreamClient(served.grpc_url, "tensorrt_llm", tok) as c:
        return c.generate(GenerateParams(text=PROMPT, max_tokens=n, min_tokens=n, **kw)).token_ids


def test_every_protocol_returns_the_same_greedy_text(served, tok):
    n = 10
    ids = greedy_ids(served, tok, n)
    assert len(ids) == n
    p = GenerateParams(text=PROMPT, max_tokens=n, min_tokens=n, return_num_output_tokens=True)
    with GrpcStreamClient(served.grpc_url, "ensemble") as c:
        streamed = c.generate(p)
    with HttpClient(served.http_url, "ensemble") as h:
        sse, whole = h.generate_stream(p), h.generate(p)
    assert streamed.num_output_tokens == sse.num_output_tokens == n == len(streamed.chunks)
    assert streamed.text == sse.text == whole.text
    # no split UTF-8 character, no lost space, and the final chunk flushes what was held back: every character
    assert streamed.text and streamed.text == tok.decode(ids, skip_special_tokens=True)
    with GrpcStreamClient(served.grpc_url, "tensorrt_llm_bls") as c:
        bls = c.generate(p)
    assert bls.text == streamed.text and bls.num_output_tokens == n
    assert streamed.ttft_s > 0 and len(streamed.itls_s) == n - 1 and streamed.e2e_s >= streamed.ttft_s


def test_server_timings_are_returned_and_ordered(served, tok):
    with GrpcStreamClient(served.grpc_url, "ensemble") as c:
        r = c.generate(GenerateParams(text=PROMPT, max_tokens=4, return_perf_metrics=True))
    t = r.server_times_ns
    assert t["arrival_time_ns"] <= t["first_scheduled_time_ns"] <= t["first_token_time_ns"] <= t["last_token_time_ns"]


def test_request_ids_are_echoed(served):
    p = GenerateParams(text=PROMPT, max_tokens=3, request_id="req-42")
    with GrpcStreamClient(served.grpc_url, "ensemble") as c:
        assert c.generate(p).server_request_id == "req-42"
    with HttpClient(served.http_url, "ensemble") as h:
        assert h.generate(p).server_request_id == "req-42"
        assert h.generate_stream(p).server_request_id == "req-42"


def test_seeded_sampling_is_reproducible_and_seed_dependent(served, tok):
    kw = dict(temperature=1.0, top_k=50, top_p=1.0)
    a, b = greedy_ids(served, tok, 12, seed=7, **kw), greedy_ids(served, tok, 12, seed=7, **kw)
    c = greedy_ids(served, tok, 12, seed=8, **kw)
    assert a == b and a != c
    assert greedy_ids(served, tok, 12, temperature=0.0) == greedy_ids(served, tok, 12)


def test_stop_and_bad_words_as_token_ids(served, tok):
    ids = greedy_ids(served, tok, 10)
    stop = ids[3]
    with GrpcStreamClient(served.grpc_url, "tensorrt_llm", tok) as c:
        stopped = c.generate(GenerateParams(text=PROMPT, max_tokens=10, stop_words_ids=[[stop]])).token_ids
        banned = c.generate(GenerateParams(text=PROMPT, max_tokens=3, bad_words_ids=[[ids[0]]])).token_ids
    assert stopped == ids[: ids.index(stop) + 1]
    assert banned[0] != ids[0]


def test_text_stop_words_end_generation_early(served, tok):
    ids = greedy_ids(served, tok, 10)
    # a generated token whose text encodes back to exactly it (the preprocessing model encodes stop words)
    stop = next(t for t in ids if tok.encode(tok.decode([t]), add_special_tokens=False) == [t])
    with HttpClient(served.http_url, "ensemble") as h:
        r = h.generate_stream(GenerateParams(text=PROMPT, max_tokens=10, stop_words=[tok.decode([stop])],
                                             return_num_output_tokens=True))
    assert r.num_output_tokens == ids.index(stop) + 1


def test_unary_grpc_refuses_a_decoupled_model(served):
    with pytest.raises(ClientError, match="decoupled: gRPC unary cannot serve it"):
        grpc_generate(served.grpc_url, "ensemble", GenerateParams(text=PROMPT))


def test_server_side_errors_are_reported_with_the_request(served):
    with pytest.raises(ClientError, match=r"request bad-1 to 'ensemble'"):
        with HttpClient(served.http_url, "ensemble") as h:
            h.generate(GenerateParams(text=PROMPT, max_tokens=100_000, request_id="bad-1"))
    with pytest.raises(ClientError, match="model 'nope'"):
        GrpcStreamClient(served.grpc_url, "nope")


@pytest.mark.parametrize("protocol", ["grpc-stream", "http-generate-stream"])
def test_ctrl_c_cancels_the_request_on_the_server(served, protocol):
    before = httpx.get(served.metrics_url).text
    tokens_before = metric_total(before, "nv_trt_llm_output_tokens_total", "tensorrt_llm")

    def interrupt(chunk, res):
        if len(res.chunks) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread while tokens stream

    p = GenerateParams(input_ids=[5, 6, 7, 8], max_tokens=400, min_tokens=400)
    with pytest.raises(KeyboardInterrupt):
        if protocol == "grpc-stream":
            with GrpcStreamClient(served.grpc_url, "tensorrt_llm") as c:
                c.generate(p, on_chunk=interrupt)
        else:  # closing the connection cancels the request
            with HttpClient(served.http_url, "tensorrt_llm") as h:
                h.generate_stream(p, on_chunk=interrupt)
    deadline, last = time.monotonic() + 30, None
    while time.monotonic() < deadline:  # the runtime polls cancellation, frees the blocks, goes idle
        time.sleep(0.4)
        text = httpx.get(served.metrics_url).text
        s = metrics_sample(text, "tensorrt_llm")
        generated = metric_total(text, "nv_trt_llm_output_tokens_total", "tensorrt_llm") - tokens_before
        if s.get("active") == 0 and s.get("kv_used") == 0 and generated >= 3 and generated == last:
            break  # idle, and the token counter has stopped moving
        last = generated
    assert s.get("active") == 0 and s.get("kv_used") == 0
    assert 3 <= generated < 400


def _wait_until_idle(served, tokens_before: float) -> float:
    """Tokens the runtime generated since `tokens_before`, once it is idle and the counter stopped moving."""
    deadline, last, s, generated = time.monotonic() + 60, None, {}, 0.0
    while time.monotonic() < deadline:
        time.sleep(0.4)
        text = httpx.get(served.metrics_url).text
        s = metrics_sample(text, "tensorrt_llm")
        generated = metric_total(text, "nv_trt_llm_output_tokens_total", "tensorrt_llm") - tokens_before
        if s.get("active") == 0 and s.get("kv_used") == 0 and generated == last:
            break
        last = generated
    assert s.get("active") == 0 and s.get("kv_used") == 0, s
    return generated


@pytest.mark.parametrize("protocol", ["grpc-stream", "http-generate-stream"])
def test_cancelling_a_streamed_ensemble_request_stops_its_generation(served, protocol):
    """Triton 2.51 does not cancel an ensemble's in-flight tensorrt_llm request when the client cancels
    (gRPC cancel, HTTP disconnect, Ctrl-C): the runtime learns it from the stream ledger and stops."""
    tokens_before = metric_total(httpx.get(served.metrics_url).text, "nv_trt_llm_output_tokens_total", "tensorrt_llm")
    seen = {}

    def interrupt(chunk, res):
        if len(res.chunks) == 3:
            seen["at"] = time.monotonic()
            raise KeyboardInterrupt

    n = 470  # with the prompt's 34 tokens, within max_seq_len 512: the widest window to stop it in
    p = GenerateParams(text=PROMPT, max_tokens=n, min_tokens=n, request_id="cancel-me")
    with pytest.raises(KeyboardInterrupt):
        if protocol == "grpc-stream":
            with GrpcStreamClient(served.grpc_url, "ensemble") as c:
                c.generate(p, on_chunk=interrupt)
        else:
            with HttpClient(served.http_url, "ensemble") as h:
                h.generate_stream(p, on_chunk=interrupt)
    generated = _wait_until_idle(served, tokens_before)
    assert 3 <= generated < n - 20, generated  # stopped soon after the client left (a loaded machine lags)


@pytest.mark.parametrize("protocol", ["stream", "http"])
def test_ctrl_c_in_the_client_command_stops_a_streamed_ensemble_request(served, protocol):
    """`enginesmith client` interrupted by SIGINT once text arrives: exit 130, and the server stops generating."""
    import signal
    import subprocess
    import sys

    from tests.support import REPO_ROOT

    tokens_before = metric_total(httpx.get(served.metrics_url).text, "nv_trt_llm_output_tokens_total", "tensorrt_llm")
    n = 470
    url = served.grpc_url if protocol == "stream" else served.http_url
    # SIGINT raises KeyboardInterrupt as in a terminal, even where the tests run with it ignored (a background
    # job); set in the child's Python, not by a preexec_fn (a fork beside this process's gRPC clients can abort)
    cmd = [sys.executable, "-c", "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "runpy.run_module('enginesmith.builders.cli', run_name='__main__', alter_sys=True)",
           "client", protocol, PROMPT, "--url", url, "--max-tokens", str(n), "--min-tokens", str(n), "--stream"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(1), proc.stderr.read().decode()  # the first streamed text
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert err.decode() == "error: cancelled (the request was cancelled on the server)\n"
    generated = _wait_until_idle(served, tokens_before)
    assert 1 <= generated < n - 20, generated


def _stream_texts(served, prompts: list[str], request_id: str, n: int) -> list[str]:
    """Stream every prompt to the ensemble at once, all with the same request id."""
    import threading

    texts: list[str | BaseException] = [""] * len(prompts)

    def run(i: int) -> None:
        try:
            with GrpcStreamClient(served.grpc_url, "ensemble") as c:
                texts[i] = c.generate(GenerateParams(text=prompts[i], max_tokens=n, min_tokens=n,
                                                     request_id=request_id)).text
        except BaseException as e:  # noqa: BLE001 - reported below
            texts[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [t for t in texts if isinstance(t, BaseException)], texts
    return texts


@pytest.mark.parametrize("request_id", ["", "1"])
def test_concurrent_streams_with_one_request_id_keep_their_own_text(served, tok, request_id):
    """Upstream's clients send "" or a constant id: each stream's text is still the decoding of its own
    tokens, every character included (the final chunk flushes what was held back)."""
    n = 24
    prompts = [PROMPT, "Paris is the capital of France.", "One two three four five six"]
    want = []
    with GrpcStreamClient(served.grpc_url, "tensorrt_llm", tok) as c:
        for text in prompts:
            ids = c.generate(GenerateParams(text=text, max_tokens=n, min_tokens=n)).token_ids
            want.append(tok.decode(ids, skip_special_tokens=True))
    assert _stream_texts(served, prompts, request_id, n) == want


def test_an_end_id_outside_the_vocabulary_means_no_end(served, tok):
    n = 12
    p = GenerateParams(text=PROMPT, max_tokens=n, end_id=len(tok) + 1000, return_num_output_tokens=True)
    with HttpClient(served.http_url, "ensemble") as h:
        assert h.generate(p).num_output_tokens == n
    with GrpcStreamClient(served.grpc_url, "tensorrt_llm", tok) as c:
        assert len(c.generate(p).token_ids) == n


@pytest.mark.parametrize("max_tokens", [2**40, 2**31])
def test_max_tokens_beyond_int32_is_refused_by_name(served, max_tokens):
    """Triton's HTTP generate endpoint stores a JSON number into the INT32 input modulo 2^32 (2^40 arrives as 0,
    2^31 as -2^31): what arrives out of range is refused with the tensor's name and the valid range (a number that
    wraps into range, 2^32 + 5 arriving as 5, reaches no model as anything else); the BLS names the step once."""
    body = {"text_input": PROMPT, "max_tokens": max_tokens}
    for model in ("ensemble", "tensorrt_llm_bls"):
        r = httpx.post(f"{served.http_url}/v2/models/{model}/generate", json=body, timeout=60)
        assert r.status_code == 400, r.text
        message = r.json()["error"]
        assert "max_tokens" in message and "outside [1, 2147483647]" in message and "\n" not in message, message
        assert message.count("preprocessing: ") == 1, message  # the step is named once
    with pytest.raises(ClientError, match=r"max_tokens=1099511627776: must be within \[1, 2147483647\]"):
        GenerateParams(text=PROMPT, max_tokens=2**40).validate()


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("stream", [False, True])
def test_outputs_have_upstreams_shapes(served, model, stream):
    """text_output is [batch * beam] (upstream's postprocessing and BLS return 1-D), the outputs passed through
    from tensorrt_llm keep its shapes: [1, 1] scalars, output_log_probs [1, 1, n]."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from enginesmith.client.grpc_stream import infer_inputs, is_final, result_outputs

    tensors = {"text_input": np.array([[PROMPT.encode()]], dtype=object), "max_tokens": np.array([[5]], np.int32),
               "min_tokens": np.array([[5]], np.int32), "stream": np.array([[stream]]),
               "return_log_probs": np.array([[True]]), "return_perf_metrics": np.array([[True]])}
    client = grpcclient.InferenceServerClient(served.grpc_url)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        client.async_stream_infer(model, infer_inputs(tensors), request_id="shapes", enable_empty_final_response=True)
        responses = []
        while True:
            result, error = events.get(timeout=60)
            assert error is None, error
            if outputs := result_outputs(result):
                responses.append(outputs)
            if is_final(result):
                break
    finally:
        client.stop_stream()
        client.close()
    # streamed: one response per token, fewer where the engine's sender merged tokens queued for the stream,
    # plus possibly one for a character the BLS held back; not streamed: exactly one
    assert (1 <= len(responses) <= 6) if stream else len(responses) == 1
    for out in responses:
        assert out["text_output"].shape == (1,) and out["text_output"].dtype == object, out["text_output"]
        for name in ("batch_index", "sequence_index", "cum_log_probs", "kv_cache_alloc_total_blocks",
                     "arrival_time_ns", "last_token_time_ns", "acceptance_rate", "total_draft_tokens"):
            assert out[name].shape == (1, 1), (name, out[name].shape)
        assert out["output_log_probs"].shape[:2] == (1, 1)
