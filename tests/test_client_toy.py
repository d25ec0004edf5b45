"""Client protocols against a real tritonserver serving toy models (tests/client_toy_model.py) whose
responses echo what they received: every sampling parameter reaches the model under upstream's input name
and dtype, over gRPC streaming, HTTP generate and gRPC unary (the toy has a non-decoupled variant)."""

from __future__ import annotations

import json

import pytest

from enginesmith.client.grpc_stream import GrpcStreamClient
from enginesmith.client.grpc_unary import grpc_generate
from enginesmith.client.http import HttpClient
from enginesmith.client.params import GenerateParams
from tests.client_toy import ToyModel, ToyServer

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

ALL = GenerateParams(text="a b c", max_tokens=3, temperature=0.5, top_k=7, top_p=0.9, length_penalty=1.1,
                     repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.4, min_tokens=2, seed=123,
                     beam_width=1, end_id=2, pad_id=0, exclude_input_in_output=True, return_log_probs=False,
                     return_perf_metrics=True, stop_words=["w9", "w10"], bad_words=["zz"], request_id="toy-1")
EXPECTED = {  # input name: (value as the model sees it, numpy dtype)
    "text_input": (["a b c"], "object"), "max_tokens": ([[3]], "int32"), "stream": ([[True]], "bool"),
    "temperature": ([[0.5]], "float32"), "top_k": ([[7]], "int32"), "top_p": ([[pytest.approx(0.9)]], "float32"),
    "length_penalty": ([[pytest.approx(1.1)]], "float32"), "repetition_penalty": ([[pytest.approx(1.2)]], "float32"),
    "presence_penalty": ([[pytest.approx(0.3)]], "float32"), "frequency_penalty": ([[pytest.approx(0.4)]], "float32"),
    "min_tokens": ([[2]], "int32"), "seed": ([[123]], "uint64"), "beam_width": ([[1]], "int32"),
    "end_id": ([[2]], "int32"), "pad_id": ([[0]], "int32"), "exclude_input_in_output": ([[True]], "bool"),
    "return_log_probs": ([[False]], "bool"), "return_perf_metrics": ([[True]], "bool"),
    "stop_words": (["w9", "w10"], "object"), "bad_words": (["zz"], "object"),
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    srv = ToyServer(tmp_path_factory.mktemp("toy"), [ToyModel("toy_text"), ToyModel("toy_unary", decoupled=False)])
    srv.start()
    yield srv
    srv.stop()


def echoed(result) -> dict:
    raw = result.outputs["toy_echo"]
    raw = raw if isinstance(raw, str) else raw.reshape(-1)[0].decode()
    return json.loads(raw)


def check(echo: dict, stream: bool) -> None:
    expected = {**EXPECTED, "stream": ([[stream]], "bool")}
    assert set(echo["values"]) == set(expected)
    for name, (value, dtype) in expected.items():
        assert echo["values"][name] == value, name
        assert echo["dtypes"][name] == dtype, name


def test_grpc_stream_sends_every_parameter_with_upstream_dtypes(toy):
    with GrpcStreamClient(toy.grpc_url, "toy_text") as c:
        r = c.generate(ALL)
    check(echoed(r), stream=True)
    assert r.text == " w3 w4 w5" and r.num_output_tokens == 3 and r.server_request_id == "toy-1"


def test_http_generate_sends_every_parameter_with_upstream_dtypes(toy):
    with HttpClient(toy.http_url, "toy_text") as h:
        r = h.generate(ALL)
    check(echoed(r), stream=False)
    assert r.text == " w3 w4 w5"


def test_grpc_unary_round_trip_on_a_non_decoupled_model(toy):
    r = grpc_generate(toy.grpc_url, "toy_unary", ALL)
    check(echoed(r), stream=False)
    assert r.text == " w3 w4 w5" and r.protocol == "grpc-unary" and r.server_request_id == "toy-1"
    t = r.server_times_ns
    assert t["arrival_time_ns"] <= t["first_scheduled_time_ns"] <= t["last_token_time_ns"]
