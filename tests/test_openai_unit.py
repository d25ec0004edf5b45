"""The OpenAI front without a server: stop strings on streamed text, request validation, sampling mapping,
prompts through the chat template and the engine's limits, the bench's targets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enginesmith.builders.tiny_model import make_tokenizer
from enginesmith.client.target import resolve_target
from enginesmith.triton_repo.openai_api.errors import ApiError
from enginesmith.triton_repo.openai_api.generation import sampling_fields
from enginesmith.triton_repo.openai_api.prompts import Limits, Prompter
from enginesmith.triton_repo.openai_api.schemas import ChatCompletionRequest, CompletionRequest, parse
from enginesmith.triton_repo.openai_api.stops import StopText

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def run_stops(stops: list[str], deltas: list[str]) -> tuple[list[str], str | None]:
    s = StopText(stops)
    out = [s.push(d) for d in deltas]
    if s.matched is None:
        out.append(s.flush())
    return out, s.matched


def test_a_stop_split_over_deltas_is_held_back_then_cut():
    out, matched = run_stops(["END"], ["ab", "cE", "N", "Dxyz"])
    assert out == ["ab", "c", "", ""] and matched == "END"
    out, matched = run_stops(["END"], ["aE", "Nz", "q"])  # a false start is released, nothing lost
    assert out == ["a", "ENz", "q", ""] and matched is None
    out, matched = run_stops(["xy", "b"], ["abxy"])  # the earliest stop wins
    assert out == ["a"] and matched == "b"


@given(st.text(alphabet="abE", max_size=30), st.lists(st.integers(1, 5), max_size=10))
def test_stops_give_the_text_before_the_first_stop_however_it_is_split(text, cuts):
    stops = ["EE", "bab"]
    pieces, i = [], 0
    for c in cuts:
        pieces.append(text[i:i + c])
        i += c
    pieces.append(text[i:])
    out, _ = run_stops(stops, pieces)
    first = min((j for j in (text.find(s) for s in stops) if j >= 0), default=len(text))
    assert "".join(out) == text[:first]


def parse_error(cls, body) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(cls, body)
    return e.value


@pytest.mark.parametrize("body, param, message", [
    ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature", "temperature=2.5: Input should be less"),
    ({"model": "m", "prompt": "x", "n": 2}, "n", "only n=1 is supported"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens=0: Input should be greater"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p", "top_p=0"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo", "echo=true is not supported"),
    ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs", "logprobs are not supported"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed", "seed=-1"),
    ({"prompt": "x"}, "model", "model: required"),
    ({"model": "m", "prompt": "x", "stream": "maybe"}, "stream", "stream='maybe': Input should be a valid boolean"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt", "prompt=[1, 'a']: must be a string, a list of token ids"),
    ({"model": "m", "prompt": "x", "stop": [1]}, "stop", "stop=[1]: must be a string or a list"),
])
def test_bad_completion_fields_are_named(body, param, message):
    e = parse_error(CompletionRequest, body)
    assert e.status == 400 and e.param == param and message in e.message
    assert e.body()["error"]["type"] == "invalid_request_error"


def test_bad_chat_fields_are_named():
    e = parse_error(ChatCompletionRequest, {"model": "m", "messages": []})
    assert e.param == "messages" and "at least 1" in e.message
    e = parse_error(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert e.param == "messages[0].content" and "=5: must be a string or a list of text parts" in e.message
    e = parse_error(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                            "tools": [{"type": "function"}]})
    assert e.param == "tools"
    req = parse(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with pytest.raises(ApiError, match=r"messages\[0\].content: part of type 'image_url'"):
        req.message_dicts()
    req = parse(ChatCompletionRequest, {"model": "m", "unknown_field": 1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.message_dicts() == [{"role": "user", "content": "ab"}]


def test_prompts_and_stops_are_normalised():
    req = parse(CompletionRequest, {"model": "m", "prompt": ["only one"], "stop": "x"})
    assert req.single_prompt() == "only one" and req.stop_strings() == ["x"]
    assert parse(CompletionRequest, {"model": "m", "prompt": [[1, 2]]}).single_prompt() == [1, 2]
    with pytest.raises(ApiError, match="2 prompts in one request"):
        parse(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).single_prompt()
    with pytest.raises(ApiError, match="up to 4 non-empty stop strings"):
        parse(CompletionRequest, {"model": "m", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}).stop_strings()


def test_sampling_maps_openai_defaults_and_greedy():
    greedy = parse(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 0, "top_p": 0.5})
    assert sampling_fields(greedy, 8) == {"top_k": 1}
    default = sampling_fields(parse(CompletionRequest, {"model": "m", "prompt": "x"}), 8)
    assert default["temperature"] == 1.0 and default["top_p"] == 1.0 and "top_k" not in default
    seeds = {sampling_fields(parse(CompletionRequest, {"model": "m", "prompt": "x"}), 8)["seed"] for _ in range(4)}
    assert len(seeds) > 1  # no seed given: a fresh one per request, so repeated requests differ
    seeded = parse(CompletionRequest, {"model": "m", "prompt": "x", "seed": 7, "top_k": 5, "ignore_eos": True,
                                       "presence_penalty": 0.5})
    assert sampling_fields(seeded, 8) == {"temperature": 1.0, "top_p": 1.0, "seed": 7, "top_k": 5,
                                          "presence_penalty": 0.5, "min_tokens": 8}


def test_prompter_checks_the_engine_limits(tok):
    p = Prompter(tok, Limits(max_input_len=8, max_seq_len=12))
    assert p.max_tokens(None, 5, 4, "prompt") == 4 and p.max_tokens(None, 5, None, "messages") == 7
    with pytest.raises(ApiError, match="more than this model's maximum input length 8") as e:
        p.max_tokens(1, 9, None, "prompt")
    assert e.value.body()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(ApiError, match="maximum context length is 12 tokens, but 13 were requested") as e:
        p.max_tokens(8, 5, None, "prompt")
    assert e.value.param == "max_tokens"
    with pytest.raises(ApiError, match="token id 100000 is outside the vocabulary"):
        p.completion_ids([1, 100000])
    assert p.completion_ids("hello") == tok.encode("hello")


def test_chat_template_is_the_tokenizers_and_its_absence_is_a_400(tok):
    p = Prompter(tok, Limits(64, 128))
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ApiError, match="tokenizer has no chat template") as e:
        p.chat_prompt(messages)
    assert e.value.status == 400 and e.value.code == "chat_template_missing"
    tok.chat_template = TEMPLATE
    try:
        assert p.chat_text(messages) == "<s><|user|>hi\n<|assistant|>"
        text = "<s><|user|>hi\n<|assistant|>"
        assert p.chat_prompt(messages) == (text, tok.encode(text, add_special_tokens=False))
        tok.chat_template = "{{ raise_exception('roles must alternate') }}"
        with pytest.raises(ApiError, match="chat template refused them: roles must alternate"):
            p.chat_prompt(messages)
    finally:
        tok.chat_template = None


def test_a_text_model_gets_the_chat_text_without_the_bos_its_encoder_adds(tmp_path):
    from tokenizers.processors import TemplateProcessing

    t = make_tokenizer(tmp_path)
    t.chat_template = TEMPLATE
    messages = [{"role": "user", "content": "hi"}]
    text, ids = Prompter(t, Limits(64, 128)).chat_prompt(messages)
    assert Prompter(t, Limits(64, 128)).for_text_model(text) == text  # this tokenizer adds no BOS
    t.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.bos_token_id)])
    p = Prompter(t, Limits(64, 128))
    assert p.for_text_model(text) == "<|user|>hi\n<|assistant|>"
    assert t.encode(p.for_text_model(text)) == ids  # what the preprocessing model will make of it


def test_an_http_target_is_an_openai_api():
    t = resolve_target("http://10.0.0.5:9000")
    assert t.openai_url == "http://10.0.0.5:9000/v1" and t.grpc_url == "" and t.metrics_url is None
    assert resolve_target("http://h:1/v1/").openai_url == "http://h:1/v1"
    assert resolve_target("h:8001").openai_url is None


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_the_fast_batch_decoder_decodes_as_the_tokenizer_does(kind, tmp_path):
    import random

    from tests.sp_tokenizer import make_sp_tokenizer
    from enginesmith.triton_repo.openai_api.generation import batch_decoder

    t = make_tokenizer(tmp_path) if kind == "bytelevel" else make_sp_tokenizer(tmp_path)
    decode, rng = batch_decoder(t), random.Random(0)
    seqs = [[rng.randrange(len(t)) for _ in range(rng.randint(0, 12))] for _ in range(200)]
    seqs.append(t.encode("Hello world! Paris is café 🙂 東京"))
    assert decode(seqs) == t.batch_decode(seqs, skip_special_tokens=True)


def test_a_text_event_is_the_whole_chunk_encoded():
    from enginesmith.triton_repo.openai_api.streaming import Shape, sse

    for chat in (False, True):
        shape = Shape(chat, "cmpl-1", "m", 5)
        for text in ("", 'a"b\\', "\0x", "é東 🙂", "\n"):
            assert shape.text_event(text) == sse(shape.chunk(text))


def test_the_openai_command_reports_what_it_cannot_reach(tmp_path):
    import socket

    import yaml
    from typer.testing import CliRunner

    from enginesmith.builders.cli import app
    from tests.support import REPO_ROOT
    from enginesmith.triton_repo.ports import free_port

    data = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-llama.yaml").read_text())
    data["model"]["source"] = str(tmp_path / "no-model")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    make_tokenizer(tmp_path / "tok")
    r = CliRunner().invoke(app, ["openai", str(recipe), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "no tokenizer for 'tiny-llama'" in r.output and "--tokenizer DIR" in r.output
    r = CliRunner().invoke(app, ["openai", str(recipe), "--tokenizer", str(tmp_path / "tok"),
                                 "--triton-grpc", f"127.0.0.1:{free_port()}"])
    assert r.exit_code == 2 and "is it running? (`enginesmith serve" in r.output
    from enginesmith.triton_repo.openai_api.runner import FrontError, listen_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(FrontError, match=r"cannot listen on 127.0.0.1:\d+: Address already in use"):
            listen_socket("127.0.0.1", taken.getsockname()[1])
