"""Client round trips against the real served tiny model: gRPC streaming, HTTP generate and generate_stream,
the tensorrt_llm model with token ids, sampling parameters, stop/bad words, request ids, Ctrl-C cancellation."""

from __future__ import annotations

import time

import httpx
import pytest

from client.grpc_stream import GrpcStreamClient
from client.grpc_unary import grpc_generate
from client.http import HttpClient
from client.params import ClientError, GenerateParams
from client.server_stats import metric_total, metrics_sample

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
    # the postprocessing model never emits a split UTF-8 character: its text is a prefix of decoding every id
    assert streamed.text and tok.decode(ids, skip_special_tokens=True).startswith(streamed.text)
    with GrpcStreamClient(served.grpc_url, "tensorrt_llm_bls") as c:
        bls = c.generate(p)
    assert bls.text.startswith(streamed.text) and bls.num_output_tokens == n
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
