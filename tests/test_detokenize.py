"""Incremental detokenization, the ensemble's stream ledger, and the text <-> tensor helpers of the
pre/postprocessing models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enginesmith.builders.tiny_model import make_tokenizer
from tests.sp_tokenizer import UNSEEN, make_sp_tokenizer
from enginesmith.triton_repo.detokenize import (
    GRACE_S,
    SEVERAL_GRACE_S,
    UNCLAIMED_S,
    IncrementalDetokenizer,
    LedgerReader,
    LedgerWriter,
    stream_key,
)
from enginesmith.triton_repo.text_tensors import (
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


def test_bytes_that_can_never_complete_a_character_are_not_held_back(bytelevel):
    """Lone UTF-8 continuation bytes decode to U+FFFD whatever follows: at most 3 tokens wait for more."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    garbage = bytelevel.convert_tokens_to_ids(bytes_to_unicode()[0x80])
    det = IncrementalDetokenizer(decoder(bytelevel))
    shown = [det.push([garbage]) for _ in range(6)]
    assert "".join(shown) == "\ufffd" * 3 and shown[:3] == ["", "", ""]  # the last 3 may still be held
    assert "".join(shown) + det.flush() == decoder(bytelevel)([[garbage] * 6])[0]


class Clock:
    def __init__(self):
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, s: float) -> None:
        self.ns += int(s * 1e9)


@pytest.fixture
def ledger(tmp_path):
    clock = Clock()
    writer = LedgerWriter(tmp_path / "streams.sqlite", clock=clock)
    reader = LedgerReader(tmp_path / "streams.sqlite", clock=clock)
    yield writer, reader, clock
    reader.close()
    writer.close()


def test_a_new_ledger_removes_those_of_servers_that_are_gone(tmp_path, monkeypatch):
    import os

    from enginesmith.triton_repo import detokenize

    monkeypatch.setattr(detokenize, "_ledger_dir", lambda: tmp_path)
    mine = detokenize.server_ledger_path(os.getpid())  # a live "server": this process
    dead = tmp_path / f"enginesmith-streams-{os.getuid()}-{2**22 + 17}-123.sqlite"  # above any pid_max
    recycled = mine.with_name(mine.name.replace(f"-{mine.stem.rsplit('-', 1)[1]}.", "-1."))  # same pid, other start
    for path in (dead, Path(f"{dead}-wal"), recycled):
        path.write_text("")
    LedgerWriter(mine).close(remove=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]


def test_ledger_keeps_streams_of_the_same_request_id_apart(tok, ledger):
    """Two streams of one client request id (upstream's clients send "" or a constant), chunks interleaved:
    each stream's text is its own, as if decoded whole."""
    writer, reader, clock = ledger
    key = stream_key("", 0)
    ids = {s: tok.encode(t, add_special_tokens=False) for s, t in zip("ab", TEXTS[:2], strict=True)}
    out = {"a": "", "b": ""}
    for i in range(max(map(len, ids.values())) + 1):
        for s, seq in ids.items():
            if i > len(seq):
                continue
            chunk, final = seq[i:i + 1], i == len(seq)  # the last chunk is empty: a final without a token
            writer.sent(s, key, chunk, final)
            clock.advance(0.001)
            out[s] += reader.take(key, chunk, decoder(tok))
    assert out == {s: tok.decode(seq) for s, seq in ids.items()}
    assert reader.take(key, ids["a"][:1], decoder(tok)) is None  # finished streams leave nothing behind
    assert reader.conn.execute("SELECT COUNT(*) FROM stream").fetchone() == (0,)


def test_ledger_final_chunk_flushes_the_held_back_tail(tok, ledger):
    writer, reader, _ = ledger
    ids = tok.encode("x€", add_special_tokens=False)
    k = max(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))  # € cut before its end
    writer.sent("s", "id-1", ids[:k], False)
    assert reader.take("id-1", ids[:k], decoder(tok)) == "x"
    writer.sent("s", "id-1", [], True)
    assert reader.take("id-1", [], decoder(tok)) == tok.decode(ids[:k])[1:]  # the incomplete € as U+FFFD
    writer.sent("t", "id-1", ids, True)  # the same id again, one whole chunk: decoded on its own
    assert reader.take("id-1", ids, decoder(tok)) == "x€"
    assert reader.take("other", ids, decoder(tok)) is None


def test_a_batch_of_chunks_is_recorded_as_its_chunks_one_by_one(tmp_path):
    """The response thread records a batch's chunks (one per row, some first, some final) in one transaction:
    the ledger then holds what sending them one by one leaves, and the reader takes them alike."""
    batches = [[("a", "ka", [1, 2], False), ("b", "kb", [3], False)],
               [("a", "ka", [4], True), ("b", "kb", [5], False), ("c", "kc", [6], False)],
               [("b", "kb", [], True), ("c", "kc", [7], True)]]
    dumps = []
    for how in ("one by one", "batched"):
        clock = Clock()
        writer = LedgerWriter(tmp_path / f"{how}.sqlite", clock=clock)
        for batch in batches:
            if how == "batched":
                writer.sent_many(batch)
            else:
                for chunk in batch:
                    writer.sent(*chunk)
            clock.advance(0.001)
        dumps.append([writer.conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("stream", "chunk")])
        reader = LedgerReader(tmp_path / f"{how}.sqlite", clock=clock)
        decode = lambda seqs: ["".join(chr(97 + t) for t in s) for s in seqs]  # noqa: E731
        assert [reader.take(key, tokens, decode) for batch in batches for _, key, tokens, _ in batch] == [
            "bc", "d", "e", "f", "g", "", "h"]
        reader.close()
        writer.close()
    assert dumps[0] == dumps[1] and len(dumps[0][1]) == 7


def test_ledger_tells_a_stream_whose_ensemble_request_is_gone(ledger):
    writer, reader, clock = ledger
    decode = lambda seqs: ["".join(chr(97 + t % 26) for t in s) for s in seqs]  # noqa: E731
    for s in ("alive", "gone", "direct"):
        writer.sent(s, s, [1], False)
    with reader.executing():
        reader.take("alive", [1], decode)
        reader.take("gone", [1], decode)
    writer.sent("gone", "gone", [2], False)  # never reaches postprocessing: its client left
    clock.advance(GRACE_S / 2)
    writer.sent("alive", "alive", [3], False)
    with reader.executing():
        reader.take("alive", [3], decode)
    assert not any(writer.gone(s) for s in ("alive", "gone", "direct"))  # within the grace period
    clock.advance(GRACE_S * 0.6)
    assert writer.gone("gone")  # postprocessing took a later chunk but not this one
    assert not writer.gone("alive") and not writer.gone("direct")  # nothing of "direct" was ever taken
    writer.sent("alive", "alive", [4], False)
    with reader.executing():
        clock.advance(GRACE_S * 4)
        assert not writer.gone("alive")  # postprocessing is busy: it may still come
    clock.advance(GRACE_S / 2)
    assert not writer.gone("alive")
    clock.advance(GRACE_S * 0.6)
    assert writer.gone("alive")  # postprocessing sat idle for the grace period: it never came
    clock.advance(UNCLAIMED_S)
    writer.sent("direct", "direct", [5], False)
    assert reader.conn.execute("SELECT COUNT(*) FROM chunk WHERE stream = 'direct'").fetchone() == (0,)


def test_several_postprocessing_instances_get_longer_before_a_stream_counts_as_gone(tmp_path):
    """Instances take chunks out of order for a while: a later chunk taken first proves less."""
    clock = Clock()
    writer = LedgerWriter(tmp_path / "l.sqlite", clock=clock)
    reader = LedgerReader(tmp_path / "l.sqlite", ordered=True, clock=clock)
    decode = lambda seqs: ["x" * len(s) for s in seqs]  # noqa: E731
    with reader.executing():  # (another instance is busy with "a"'s chunk all along)
        for s in ("a", "b"):
            writer.sent(s, s, [1], False)
            reader.take(s, [1], decode)
        writer.sent("a", "a", [2], False)
        clock.advance(0.001)
        writer.sent("b", "b", [2], False)
        reader.take("b", [2], decode)
        clock.advance(GRACE_S * 2)
        assert not writer.gone("a")
        clock.advance(SEVERAL_GRACE_S)
        assert writer.gone("a")
    reader.close()
    writer.close()


def test_an_instance_given_a_streams_later_chunk_waits_for_its_earlier_one(tok, tmp_path):
    import threading
    import time

    path = tmp_path / "l.sqlite"
    writer = LedgerWriter(path)
    first, second = (LedgerReader(path, ordered=True) for _ in range(2))
    ids = tok.encode("Paris café", add_special_tokens=False)[:2]
    for t in ids:
        writer.sent("s", "k", [t], False)
    got = {}

    def slow_instance():
        time.sleep(0.1)  # the earlier chunk's instance is late
        got["first"] = (first.take("k", ids[:1], decoder(tok)), time.monotonic())

    t = threading.Thread(target=slow_instance)
    t.start()
    got["second"] = (second.take("k", ids[1:], decoder(tok)), time.monotonic())
    t.join()
    assert got["first"][1] <= got["second"][1]  # it waited
    assert got["first"][0] + got["second"][0] == tok.decode(ids)
    for c in (first, second, writer):
        c.close()


def test_ledger_skips_a_gone_streams_chunk_with_the_same_id_and_tokens(ledger):
    writer, reader, clock = ledger
    decode = lambda seqs: [",".join(map(str, s)) + ";" for s in seqs]  # noqa: E731
    def send(stream, tokens):
        clock.advance(0.001)
        writer.sent(stream, "", tokens, False)

    for s in ("old", "new"):
        send(s, [1])
        reader.take("", [1], decode)
    send("old", [7])  # its client left: never taken
    send("new", [8])
    reader.take("", [8], decode)
    send("new", [7])
    reader.take("", [7], decode)  # sent after a chunk already taken: "new"'s, not the older one of "old"
    taken = dict(reader.conn.execute("SELECT id, taken FROM stream").fetchall())
    assert taken == {"old": 0, "new": 2}


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
    arr = text_array(["é", "b"])  # [batch * beam], as upstream's postprocessing returns OUTPUT
    assert arr.shape == (2,) and arr[0] == "é".encode() and arr.dtype == np.object_
