"""Text <-> tensor conversions of the preprocessing and postprocessing models (no Triton import).

Shapes follow upstream's Python models: every tensor has the request's batch dimension first.
Word lists (stop / bad words) are packed as upstream's `[batch, 2, n]`: row 0 the concatenated token ids
of all words, row 1 each word's end offset, padded with 0 and -1.
"""

from __future__ import annotations

import numpy as np


class RequestInputError(ValueError):
    """A request input that cannot be tokenized; the message names the tensor and the fix."""


def texts(arr: np.ndarray, name: str) -> list[list[str]]:
    """A BYTES tensor [batch, n] as text per row (UTF-8 required)."""
    rows = []
    for b, row in enumerate(arr.reshape(arr.shape[0], -1)):
        out = []
        for item in row:
            try:
                out.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
            except UnicodeDecodeError:
                raise RequestInputError(f"{name} row {b} is not valid UTF-8 text") from None
        rows.append(out)
    return rows


def encode_prompts(tok, queries: list[str], add_special_tokens: bool, pad_id: int, name: str = "QUERY"):
    """Prompts -> (ids [batch, max_len] int32 padded with pad_id, lengths [batch, 1] int32)."""
    ids = []
    for b, text in enumerate(queries):
        if not text:
            raise RequestInputError(f"{name} row {b} is empty: give a non-empty prompt (text_input)")
        row = tok.encode(text, add_special_tokens=add_special_tokens)
        if not row:
            raise RequestInputError(f"{name} row {b} tokenizes to no tokens: give a longer prompt")
        ids.append(row)
    width = max(len(r) for r in ids)
    out = np.full((len(ids), width), pad_id if pad_id >= 0 else 0, dtype=np.int32)
    for b, row in enumerate(ids):
        out[b, :len(row)] = row
    return out, np.array([[len(r)] for r in ids], dtype=np.int32)


def word_lists(tok, words: list[list[str]] | None, batch: int) -> np.ndarray:
    """Stop / bad words per row -> [batch, 2, n] int32 (n >= 1 when any word is given, else 0)."""
    if words is None:
        return np.empty((batch, 2, 0), dtype=np.int32)
    flat, offsets = [], []
    for row in words:
        ids, ends = [], []
        for word in row:
            w = tok.encode(word, add_special_tokens=False) if word else []
            if w:
                ids += w
                ends.append(len(ids))
        flat.append(ids)
        offsets.append(ends)
    width = max(1, max(len(r) for r in flat))
    out = np.zeros((len(flat), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for b, (ids, ends) in enumerate(zip(flat, offsets, strict=True)):
        out[b, 0, :len(ids)] = ids
        out[b, 1, :len(ends)] = ends
    return out


def embedding_bias(tok, words: list[list[str]] | None, weights: np.ndarray | None, batch: int) -> np.ndarray:
    """Per-row logit bias over the tokenizer's vocabulary ([batch, 0] when no words are given)."""
    if words is None or weights is None:
        return np.empty((batch, 0), dtype=np.float32)
    weights = weights.reshape(len(words), -1)
    out = np.zeros((len(words), len(tok)), dtype=np.float32)
    for b, row in enumerate(words):
        if len(row) != weights.shape[1]:
            raise RequestInputError(f"embedding_bias_words row {b} has {len(row)} words but "
                                    f"embedding_bias_weights has {weights.shape[1]}: give one weight per word")
        for word, weight in zip(row, weights[b], strict=True):
            for tid in tok.encode(word, add_special_tokens=False) if word else []:
                out[b, tid] += weight
    return out


def ids_per_row(value: np.ndarray | None, default: int, batch: int) -> np.ndarray:
    """END_ID / PAD_ID as [batch, 1] int32 (the tokenizer's id when absent)."""
    if value is None:
        return np.full((batch, 1), default, dtype=np.int32)
    return value.reshape(batch, -1)[:, :1].astype(np.int32)


INT32_MAX = 2**31 - 1


def output_lengths(value: np.ndarray) -> np.ndarray:
    """REQUEST_OUTPUT_LEN as [batch, 1] int32, each in [1, INT32_MAX].

    Triton's HTTP generate endpoint stores a JSON number into this INT32 input modulo 2^32 before any model
    sees it (2^40 arrives as 0): what arrives out of range is refused, naming the range."""
    lens = value.reshape(value.shape[0], -1)[:, :1].astype(np.int64)
    for b, n in enumerate(lens[:, 0]):
        if not 1 <= n <= INT32_MAX:
            raise RequestInputError(f"REQUEST_OUTPUT_LEN (max_tokens) row {b} is {n}, outside [1, {INT32_MAX}]: "
                                    "ask for at least 1 token (a JSON number past INT32 arrives wrapped mod 2^32)")
    return lens.astype(np.int32)


def token_rows(tokens: np.ndarray, lengths: np.ndarray) -> list[list[list[int]]]:
    """TOKENS_BATCH [batch, beam, len] + SEQUENCE_LENGTH [batch, beam] -> token ids per (row, beam)."""
    if tokens.ndim == 2:  # [batch, len]: one beam
        tokens = tokens[:, None, :]
    lengths = lengths.reshape(tokens.shape[0], -1)
    return [[[int(t) for t in tokens[b, k, :max(0, int(lengths[b, k]))]] for k in range(tokens.shape[1])]
            for b in range(tokens.shape[0])]


def text_array(texts: list[str]) -> np.ndarray:
    """Text per (row, beam), row-major -> BYTES tensor [batch * beam], the shape upstream's models return."""
    out = np.empty(len(texts), dtype=np.object_)
    out[:] = [s.encode("utf-8") for s in texts]
    return out
