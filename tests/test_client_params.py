"""Client-side encoding without a server: request tensors per contract, SSE parsing, targets, datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from enginesmith.builders.tiny_model import make_tokenizer
from enginesmith.client.dataset import DatasetError, load_sharegpt, random_prompts
from enginesmith.client.http import sse_events
from enginesmith.client.params import ClientError, GenerateParams, build_inputs, contract_of, pack_words
from enginesmith.client.target import resolve_target
from enginesmith.client.tokenizer import with_token_ids
from tests.support import REPO_ROOT


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_text_contract_tensors_have_upstream_names_dtypes_and_batch_dim():
    p = GenerateParams(text="hi there", max_tokens=5, temperature=0.7, top_k=3, top_p=0.9, seed=11,
                       repetition_penalty=1.1, min_tokens=2, stop_words=["a b", "c"], end_id=2)
    t = build_inputs(p, "text", batched=True)
    assert t["text_input"].shape == (1, 1) and t["text_input"][0, 0] == b"hi there"
    assert t["max_tokens"].dtype == np.int32 and t["max_tokens"].tolist() == [[5]]
    assert t["stream"].dtype == np.bool_ and t["stream"].tolist() == [[True]]
    assert t["top_k"].dtype == np.int32 and t["top_p"].dtype == np.float32
    assert t["seed"].dtype == np.uint64 and t["seed"].tolist() == [[11]]
    assert t["stop_words"].shape == (1, 2) and t["stop_words"].tolist() == [[b"a b", b"c"]]
    assert "bad_words" not in t and "presence_penalty" not in t  # unset: the model's default applies
    unbatched = build_inputs(p, "text", batched=False)
    assert unbatched["max_tokens"].shape == (1,) and unbatched["stop_words"].shape == (2,)


def test_tokens_contract_renames_sampling_inputs_and_packs_stop_words():
    p = GenerateParams(input_ids=[5, 6, 7], max_tokens=4, top_k=2, top_p=0.5, length_penalty=1.0,
                       stop_words_ids=[[9, 10], [11]], stream=False)
    t = build_inputs(p, "tokens", batched=True)
    assert t["input_ids"].tolist() == [[5, 6, 7]] and t["input_lengths"].tolist() == [[3]]
    assert t["request_output_len"].tolist() == [[4]] and t["streaming"].tolist() == [[False]]
    assert t["runtime_top_k"].tolist() == [[2]] and "top_k" not in t and "len_penalty" in t
    assert t["stop_words_list"].tolist() == [[[9, 10, 11], [2, 3, -1]]]


def test_pack_words_matches_upstream_layout():
    assert pack_words([[1, 2], [3]]).tolist() == [[[1, 2, 3], [2, 3, -1]]]
    assert pack_words([[4]]).tolist() == [[[4], [1]]]


def test_llmapi_contract_and_contract_detection():
    p = GenerateParams(text="x", max_tokens=3, temperature=0.0, stop_words=["end"])
    t = build_inputs(p, "llmapi", batched=False)
    assert t["sampling_param_max_tokens"].tolist() == [3] and t["sampling_param_stop"].tolist() == [b"end"]
    assert contract_of({"text_input", "sampling_param_max_tokens"}) == "llmapi"
    assert contract_of({"text_input", "max_tokens"}) == "text"
    assert contract_of({"input_ids", "input_lengths"}) == "tokens"
    with pytest.raises(ClientError, match="not an LLM model"):
        contract_of({"QUERY"}, "preprocessing")


def test_bad_requests_are_refused_with_the_field_named():
    with pytest.raises(ClientError, match="max_tokens=0"):
        build_inputs(GenerateParams(text="x", max_tokens=0), "text", True)
    with pytest.raises(ClientError, match="empty prompt"):
        build_inputs(GenerateParams(text=""), "text", True)
    with pytest.raises(ClientError, match="top_p=1.5"):
        build_inputs(GenerateParams(text="x", top_p=1.5), "text", True)
    with pytest.raises(ClientError, match=r"does not declare input\(s\) \['top_k'\]"):
        build_inputs(GenerateParams(text="x", top_k=2), "text", True, accepted={"text_input", "max_tokens", "stream"})
    with pytest.raises(ClientError, match="length_penalty is not an input of the llmapi"):
        build_inputs(GenerateParams(text="x", length_penalty=1.0), "llmapi", False)
    with pytest.raises(ClientError, match="must be token ids"):
        build_inputs(GenerateParams(input_ids=[1], stop_words=["a"]), "tokens", True)


def test_with_token_ids_encodes_prompt_words_and_default_ids(tok):
    p = with_token_ids(GenerateParams(text="The quick brown fox", stop_words=["fox"]), tok)
    assert p.input_ids == tok.encode("The quick brown fox")
    assert p.stop_words_ids == [tok.encode("fox", add_special_tokens=False)] and p.stop_words == []
    assert p.end_id == tok.eos_token_id and p.pad_id == tok.pad_token_id
    with pytest.raises(ClientError, match="pass --tokenizer"):
        with_token_ids(GenerateParams(text="x"), None)


def test_sse_events_parse_data_lines_and_multiline_events():
    lines = ['data: {"text_output": "a"}', "", 'data: {"text_output":', 'data: "b"}', "", ": comment", ""]
    assert [e["text_output"] for e in sse_events(iter(lines))] == ["a", "b"]


def test_random_prompts_have_exact_token_lengths(tok):
    prompts = random_prompts(tok, 12, isl=40, osl=7, seed=3)
    assert [len(tok.encode(p.text)) for p in prompts] == [40] * 12
    assert all(list(p.input_ids) == tok.encode(p.text) and p.output_len == 7 for p in prompts)
    assert random_prompts(tok, 2, 40, 7, seed=3) == prompts[:2]  # seeded
    with pytest.raises(DatasetError, match="must exceed"):
        random_prompts(tok, 1, isl=0, osl=1)


def test_sharegpt_loader_takes_first_turns_and_applies_length_filters(tmp_path, tok):
    convs = [{"conversations": [{"from": "human", "value": "The quick brown fox jumps over"},
                                {"from": "gpt", "value": "the lazy dog and more words here"}]},
             {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "short"}]},
             {"conversations": [{"from": "human", "value": "only one turn"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    got = load_sharegpt(path, tok, 1)
    assert got[0].text == convs[0]["conversations"][0]["value"]
    assert got[0].output_len == len(tok.encode(convs[0]["conversations"][1]["value"], add_special_tokens=False))
    with pytest.raises(DatasetError, match="only 1 usable conversations of the 2"):
        load_sharegpt(path, tok, 2)


def test_targets_from_recipe_and_url(tmp_path):
    t = resolve_target(str(REPO_ROOT / "recipes" / "tiny-llama.yaml"), tmp_path)
    assert t.grpc_url == "127.0.0.1:8001" and t.http_url == "http://127.0.0.1:8000"
    assert t.metrics_url == "http://127.0.0.1:8002/metrics" and t.bench_dir == tmp_path / "tiny-llama" / "bench"
    assert t.slo_ms == {"ttft": 5000, "tpot": 1000} and (t.isl, t.osl) == (64, 32)
    u = resolve_target("grpc://10.0.0.5:9001", tmp_path)
    assert u.grpc_url == "10.0.0.5:9001" and u.http_url == "http://10.0.0.5:9000" and u.metrics_url is None
    with pytest.raises(ClientError, match="host:port"):
        resolve_target("localhost", tmp_path)


def test_random_prompts_with_a_shared_prefix_start_with_the_same_tokens(tok):
    prompts = random_prompts(tok, 6, isl=40, osl=3, seed=1, shared_prefix=24)
    assert [len(p.input_ids) for p in prompts] == [40] * 6
    assert len({p.input_ids[:24] for p in prompts}) == 1 and len({p.input_ids[24:] for p in prompts}) == 6
    assert all(list(p.input_ids) == tok.encode(p.text) for p in prompts)
    with pytest.raises(DatasetError, match="shared prefix of 40 tokens: .* shorter than the input length 40"):
        random_prompts(tok, 1, isl=40, osl=1, shared_prefix=40)


def test_prefix_cache_hits_count_blocks_like_the_runtime():
    from enginesmith.client.dataset import prefix_cache_hits

    system = tuple(range(100, 108))  # two blocks of 4
    prompts = [system + (1,), system + (2, 3), system, (9,) + system[1:] + (4,), system[:4] + (5, 6, 7, 8, 9)]
    # first: 3 blocks, none cached; second: 2 hit of 3; third: 1 of 2 (its last token is computed);
    # fourth: other first block, no hit of 3; fifth: 1 of 3 (its second block differs)
    assert prefix_cache_hits(prompts, 4) == (0 + 2 + 1 + 0 + 1, 3 + 3 + 2 + 3 + 3)
    seen: set[int] = set()
    assert prefix_cache_hits(prompts[:1], 4, seen) == (0, 3)
    assert prefix_cache_hits(prompts[1:2], 4, seen) == (2, 3)  # `seen` carries over
