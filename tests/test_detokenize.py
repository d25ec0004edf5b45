"""Incremental detokenization and the text <-> tensor helpers of the pre/postprocessing models."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders.tiny_model import make_tokenizer
from tests.sp_tokenizer import UNSEEN, make_sp_tokenizer
from triton_repo.detokenize import IncrementalDetokenizer, StreamDetokenizers
from triton_repo.text_tensors import (
    RequestInputError,
    embedding_bias,
    encode_prompts,
    output_lengths,
    text_array,
    token_rows,
    word_lists,
)

TEXTS = [UNSEEN, "Hello world! Paris is café 🙂 東京", "  two  spaces, then\nnewline ümlauts"]


@pytest.fixture(scope="module", params=["sentencepiece", "bytelevel"])
def tok(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return make_sp_tokenizer(d) if request.param == "sentencepiece" else make_tokenizer(d)


def decoder(tok):
    return lambda seqs: tok.batch_decode(seqs, skip_special_tokens=True)


def stream(tok, ids, sizes):
    det, out, i = IncrementalDetokenizer(decoder(tok)), [], 0
    for n in sizes:
        out.append(det.push(ids[i:i + n]))
        i += n
    out.append(det.push(ids[i:]))
    return out, det.flush()


def test_naive_chunk_decoding_is_wrong_for_these_texts(tmp_path):
    """The bug being fixed: decoding one token at a time drops spaces (SentencePiece) and splits characters."""
    sp = make_sp_tokenizer(tmp_path)
    ids = sp.encode(UNSEEN, add_special_tokens=False)
    naive = "".join(sp.decode([i]) for i in ids)
    assert naive != UNSEEN and "\ufffd" in naive and naive.count(" ") < UNSEEN.count(" ")


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_equals_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas, tail = stream(tok, ids, [1] * len(ids))
    assert "".join(deltas) + tail == tok.decode(ids)
    assert tok.decode(ids).strip() == text.strip()  # both tokenizers round-trip these texts
    assert all("\ufffd" not in d for d in deltas)  # a character is never split across deltas


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_chunking_equals_full_decode(tok, data):
    text = data.draw(st.sampled_from(TEXTS))
    ids = tok.encode(text, add_special_tokens=False)
    sizes = data.draw(st.lists(st.integers(0, 4), max_size=len(ids)))
    deltas, tail = stream(tok, ids, sizes)
    assert "".join(deltas) + tail == tok.decode(ids)
    assert tail == ""


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("bytelevel"))


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 299), max_size=40), sizes=st.lists(st.integers(1, 3), max_size=40))
def test_random_tokens_equal_full_decode(bytelevel, ids, sizes):
    """Garbage a random model emits (invalid byte sequences, special tokens) still joins to decode(all).

    Byte-level BPE only (the tiny models' tokenizer): SentencePiece's ByteFallback replaces a whole run of
    byte pieces by U+FFFD once the run turns invalid, so its decode is not prefix-stable on such garbage.
    """
    deltas, tail = stream(bytelevel, ids, sizes)
    assert "".join(deltas) + tail == decoder(bytelevel)([ids])[0]


def test_incomplete_character_is_held_then_flushed(tok):
    ids = tok.encode("x€", add_special_tokens=False)
    k = max(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))  # € cut before its last byte
    det = IncrementalDetokenizer(decoder(tok))
    shown = det.push(ids[:k])
    tail = det.flush()
    assert shown == "x" and tail and set(tail) == {"\ufffd"}
    assert shown + tail == tok.decode(ids[:k])


def test_stream_detokenizers_keep_streams_apart(tok):
    streams = StreamDetokenizers(decoder(tok))
    a, b = (tok.encode(t, add_special_tokens=False) for t in TEXTS[:2])
    out = {"a": "", "b": ""}
    for i in range(max(len(a), len(b))):
        out["a"] += streams.text("a", a[i:i + 1]) if i < len(a) else ""
        out["b"] += streams.text("b", b[i:i + 1]) if i < len(b) else ""
    assert out == {"a": tok.decode(a), "b": tok.decode(b)}
    assert streams.text("", a) == tok.decode(a) and len(streams) == 2  # no key: decoded whole, no state


def test_stream_detokenizers_expire(tok):
    streams = StreamDetokenizers(decoder(tok), ttl_s=0.0)
    ids = tok.encode("€", add_special_tokens=False)
    assert streams.text("x", ids[:1]) == ""
    streams.text("y", ids)  # "x" has been idle longer than ttl_s: dropped
    assert len(streams) == 1
    capped = StreamDetokenizers(decoder(tok), max_streams=2)
    for key in "pqr":
        capped.text(key, ids)
    assert len(capped) == 2


def test_word_lists_are_packed_like_upstream(tok):
    words = [["Hello", "world"], [], ["Paris"]]
    packed = word_lists(tok, words, 3)
    hello, world, paris = (tok.encode(w, add_special_tokens=False) for w in ("Hello", "world", "Paris"))
    width = len(hello) + len(world)
    assert packed.shape == (3, 2, width) and packed.dtype == np.int32
    assert packed[0, 0].tolist() == hello + world
    assert packed[0, 1].tolist() == [len(hello), width] + [-1] * (width - 2)
    assert packed[1, 1].tolist() == [-1] * width
    assert packed[2, 0, :len(paris)].tolist() == paris and packed[2, 1, 0] == len(paris)
    assert word_lists(tok, None, 2).shape == (2, 2, 0)


def test_prompt_encoding_and_errors(tok):
    ids, lens = encode_prompts(tok, ["Hello world", "Hi"], True, pad_id=0)
    assert lens[:, 0].tolist() == [len(tok.encode("Hello world")), len(tok.encode("Hi"))]
    assert ids[1, lens[1, 0]:].tolist() == [0] * (ids.shape[1] - lens[1, 0])
    with pytest.raises(RequestInputError, match="QUERY row 1 is empty"):
        encode_prompts(tok, ["x", ""], True, 0)
    with pytest.raises(RequestInputError, match=r"max_tokens\) row 0 is 0"):
        output_lengths(np.array([[0]], dtype=np.int32))
    with pytest.raises(RequestInputError, match="has 2 words but embedding_bias_weights has 1"):
        embedding_bias(tok, [["a", "b"]], np.array([[1.0]], dtype=np.float32), 1)
    bias = embedding_bias(tok, [["Paris"]], np.array([[2.5]], dtype=np.float32), 1)
    assert bias.shape == (1, len(tok)) and bias[0, tok.encode("Paris", add_special_tokens=False)].min() == 2.5


def test_token_rows_and_text_array():
    tokens = np.array([[[5, 6, 7], [8, 9, -1]]], dtype=np.int32)
    assert token_rows(tokens, np.array([[3, 2]])) == [[[5, 6, 7], [8, 9]]]
    assert token_rows(tokens[:, 0], np.array([[1]])) == [[[5]]]
    arr = text_array([["é", "b"]])
    assert arr.shape == (1, 2) and arr[0, 0] == "é".encode()
