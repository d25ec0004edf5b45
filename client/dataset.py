"""Benchmark prompts: a ShareGPT-format file, or random prompts of exact token lengths (ISL/OSL).

Lengths are counted with the model's tokenizer the way the preprocessing model encodes (special tokens
included), so a prompt of `isl` tokens here is `isl` input tokens on the server. Random prompts may all start
with the same `shared_prefix` tokens (a system prompt), the workload KV-cache reuse serves;
`prefix_cache_hits` counts the blocks of a set of prompts an unbounded prefix cache would find.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    text: str
    input_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)


def _single_token_words(tokenizer: Any, rng: random.Random, limit: int = 4000) -> list[str]:
    """Vocabulary entries that are one whole word with a leading space and encode back to themselves."""
    ids = sorted(tokenizer.get_vocab().values())  # the dict order is not stable across loads
    rng.shuffle(ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words = []
    for i in ids:
        if i in special:
            continue
        s = tokenizer.decode([i])
        if len(s) > 1 and s[0] == " " and s[1:].isalpha() and tokenizer.encode(s, add_special_tokens=False) == [i]:
            words.append(s)
            if len(words) >= limit:
                break
    if len(words) < 8:
        raise DatasetError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has too few whole-word tokens "
                           "to build random prompts of exact length: use a ShareGPT file instead")
    return words


def exact_length_text(tokenizer: Any, n: int, rng: random.Random, words: list[str],
                      prefix: tuple[str, list[int]] = ("", [])) -> tuple[str, list[int]]:
    """Text whose encoding is exactly `n` tokens (special tokens included); adjusts until it is. With `prefix`
    (text, its ids), the text starts with that text and its encoding with those ids."""
    head, head_ids = prefix
    fixed = len(head_ids) if head else len(tokenizer.encode("", add_special_tokens=True))
    if n <= fixed:
        raise DatasetError(f"input length {n} must exceed the {fixed} "
                           + ("tokens of the shared prefix" if head else "special token(s) the tokenizer adds"))
    picked = [rng.choice(words) for _ in range(n - fixed)]
    for _ in range(50):
        text = head + "".join(picked)
        ids = tokenizer.encode(text)
        if len(ids) == n and ids[: len(head_ids)] == head_ids:
            return text, ids
        if len(ids) == n:  # the words merged with the prefix's last token: other words may not
            picked = [rng.choice(words) for _ in picked]
            continue
        if len(ids) > n:
            picked.pop()
        else:
            picked.append(rng.choice(words))
    raise DatasetError(f"could not build a prompt of exactly {n} tokens with this tokenizer "
                       f"(last try: {len(ids)}): use a ShareGPT file")


def random_prompts(tokenizer: Any, num: int, isl: int, osl: int, seed: int = 0,
                   shared_prefix: int = 0) -> list[Prompt]:
    """`num` random prompts of exactly `isl` tokens, each asking for exactly `osl` output tokens; the first
    `shared_prefix` tokens (0: none) are the same in all of them."""
    if num < 1 or osl < 1:
        raise DatasetError(f"num_prompts={num} and osl={osl} must be >= 1")
    if shared_prefix < 0 or 0 < isl <= shared_prefix:
        raise DatasetError(f"shared prefix of {shared_prefix} tokens: it must be >= 0 and shorter than the "
                           f"input length {isl}")
    rng = random.Random(seed)
    words = _single_token_words(tokenizer, rng)
    head = exact_length_text(tokenizer, shared_prefix, rng, words) if shared_prefix else ("", [])
    out = []
    for _ in range(num):
        text, ids = exact_length_text(tokenizer, isl, rng, words, head)
        out.append(Prompt(text, tuple(ids), osl))
    return out


def prefix_cache_hits(prompts: Iterable[tuple[int, ...]], tokens_per_block: int,
                      seen: set[int] | None = None) -> tuple[int, int]:
    """(hit, total) prompt blocks of `prompts` in order, counted as the runtime's prefix cache counts them
    (kv_cache_block_type reused / missed) if it never evicted: a block hits when an earlier prompt (or one in
    `seen`, which is updated) had the same tokens up to its end; at most (len - 1) // tokens_per_block blocks
    of a prompt can hit, since its last token is always computed."""
    seen = set() if seen is None else seen
    hits = total = 0
    for ids in prompts:
        total += -(-len(ids) // tokens_per_block)
        keys, key = [], 0
        for i in range(len(ids) // tokens_per_block):  # every full block is computed, so cached after
            key = hash((key, tuple(ids[i * tokens_per_block: (i + 1) * tokens_per_block])))
            keys.append(key)
        reusable = (len(ids) - 1) // tokens_per_block
        hits += next((i for i, k in enumerate(keys[:reusable]) if k not in seen), reusable)
        seen.update(keys)
    return hits, total


def load_sharegpt(path: str | Path, tokenizer: Any, num: int, seed: int = 0, max_input_len: int = 1024,
                  max_seq_len: int = 2048, output_len: int | None = None) -> list[Prompt]:
    """First human turn as the prompt, the first reply's token count as the output length (vLLM's rules:
    skip prompts or replies under 4 tokens and anything over the length limits)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"ShareGPT file {p}: {e}") from e
    if not isinstance(data, list):
        raise DatasetError(f"ShareGPT file {p}: expected a JSON list of {{'conversations': [...]}} records")
    pairs = [(c["conversations"][0]["value"], c["conversations"][1]["value"]) for c in data
             if isinstance(c, dict) and len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(pairs)
    out: list[Prompt] = []
    for prompt, reply in pairs:
        ids = tokenizer.encode(prompt)
        olen = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if len(ids) < 4 or olen < 4 or len(ids) > max_input_len or len(ids) + olen > max_seq_len:
            continue
        out.append(Prompt(prompt, tuple(ids), olen))
        if len(out) == num:
            return out
    raise DatasetError(f"ShareGPT file {p}: only {len(out)} usable conversations of the {num} asked for "
                       f"(limits: input <= {max_input_len}, input+output <= {max_seq_len} tokens)")
