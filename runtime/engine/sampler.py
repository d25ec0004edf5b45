"""Token sampling with TensorRT-LLM's semantics.

Per row, in TensorRT-LLM's order (penaltyKernels.cu): temperature, then repetition / presence /
frequency penalties over every token of the sequence so far (prompt included), then min_tokens
(end_id banned until that many tokens were generated), then bad words; then top-k / top-p sampling.
`top_k == 0 and top_p == 0` means greedy (TensorRT-LLM turns it into top_k = 1), as does temperature 0.
Each request samples from its own generator seeded with `seed` (default 0, as TensorRT-LLM), so a
request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


NO_TOKEN = -1
"""Sampled for a row whose every token is banned."""
NOTHING_TO_SAMPLE = "every token is banned by bad_words_list / min_tokens: nothing can be sampled"


class SamplingError(ValueError):
    """Sampling parameters a request cannot use."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    """Logits are divided by it; 0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0: no limit; with top_p == 0 too: greedy)."""
    top_p: float = 0.0
    """Keep the smallest set of tokens whose probability reaches top_p (0: off)."""
    seed: int = 0
    """Seed of this request's random generator."""
    repetition_penalty: float = 1.0
    """Seen tokens: positive logits divided by it, negative ones multiplied."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every seen token."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence."""
    min_tokens: int = 0
    """end_id cannot be generated before this many output tokens."""
    end_id: int | None = None
    """Generating this token ends the request (it is not part of the output). An id outside the vocabulary is
    never generated, so the request never ends at an end token (TensorRT-LLM accepts one, load tools send it)."""
    stop_words: tuple[tuple[int, ...], ...] = ()
    """Token sequences that end the request once generated (they stay in the output)."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    """Token sequences that may never be completed."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1 or (self.top_k == 0 and self.top_p == 0)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise SamplingError naming the first bad field."""
        checks = [
            (self.temperature >= 0, "temperature", self.temperature, "must be >= 0"),
            (self.top_k >= 0, "runtime_top_k", self.top_k, "must be >= 0"),
            (0.0 <= self.top_p <= 1.0, "runtime_top_p", self.top_p, "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "must be > 0"),
            (self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be >= 0"),
            (self.seed >= 0, "seed", self.seed, "must be >= 0"),
            (self.end_id is None or self.end_id >= 0, "end_id", self.end_id, "must be >= 0"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise SamplingError(f"{name}={value} {rule}")
        for name in ("stop_words", "bad_words"):
            for word in getattr(self, name):
                if not word or not all(0 <= t < vocab_size for t in word):
                    raise SamplingError(f"{name}_list has word {list(word)}: token ids must be in [0, {vocab_size})")


def ends_with_stop_word(tokens: list[int], stop_words: tuple[tuple[int, ...], ...]) -> bool:
    return any(len(tokens) >= len(w) and tuple(tokens[-len(w):]) == w for w in stop_words)


class SequenceSampler:
    """One request's sampling state: its generator and token counts for the penalties."""

    def __init__(self, params: SamplingParams, tokens: list[int], prompt_len: int, vocab_size: int,
                 device: torch.device | str = "cpu"):
        self.params, self.tokens, self.prompt_len, self.vocab_size = params, tokens, prompt_len, vocab_size
        self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self._counts: torch.Tensor | None = None
        self._counted = 0

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def counts(self, device: torch.device) -> torch.Tensor:
        """Occurrences of every vocab id in the sequence so far, updated incrementally."""
        if self._counts is None:
            self._counts = torch.zeros(self.vocab_size, dtype=torch.float32, device=device)
        new = self.tokens[self._counted:]
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=device)
            self._counts.index_add_(0, ids, torch.ones(len(new), device=device))
            self._counted = len(self.tokens)
        return self._counts

    def end_id_banned(self) -> bool:
        """min_tokens not reached yet: end_id (when in the vocabulary) cannot be generated now."""
        p = self.params
        return p.end_id is not None and p.end_id < self.vocab_size and self.num_generated < p.min_tokens

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) float32 logits -> logits after temperature, penalties, min_tokens and bad words."""
        p, x = self.params, logits.float().clone()
        if p.temperature > 0 and p.temperature != 1.0:
            x = x / p.temperature
        if p.has_penalties:
            counts = self.counts(x.device)
            seen = counts > 0
            if p.repetition_penalty != 1.0:
                x = torch.where(seen, torch.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty), x)
            x = x - p.presence_penalty * seen - p.frequency_penalty * counts
        if self.end_id_banned():
            x[p.end_id] = float("-inf")
        for word in p.bad_words:
            head = word[:-1]
            if not head or (len(self.tokens) >= len(head) and tuple(self.tokens[-len(head):]) == head):
                x[word[-1]] = float("-inf")
        return x

    def pick(self, x: torch.Tensor) -> int:
        """Choose a token from processed logits (V,)."""
        p = self.params
        if p.is_greedy:
            return int(x.argmax())
        values, ids = x.sort(descending=True)
        if p.top_k > 0:
            values, ids = values[: p.top_k], ids[: p.top_k]
        probs = torch.softmax(values, dim=-1)
        if 0 < p.top_p < 1:
            before = probs.cumsum(-1) - probs  # probability mass of the more likely tokens
            probs = torch.where(before < p.top_p, probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return int(ids[choice])


def _batched(row: SequenceSampler) -> bool:
    """Rows whose whole processing is a temperature, an end_id ban and an argmax: they run as one batch."""
    p = row.params
    return p.is_greedy and not p.has_penalties and not p.bad_words


def _sample_batched(logits: torch.Tensor, rows: list[SequenceSampler]) -> tuple[list[int], list[float]]:
    """The batched rows in one pass (the same result as SequenceSampler.process + pick, row by row)."""
    x = logits.float()
    temps = [r.params.temperature or 1.0 for r in rows]
    if any(t != 1.0 for t in temps):
        x = x / torch.tensor(temps, device=x.device)[:, None]
    banned = [(i, r.params.end_id) for i, r in enumerate(rows) if r.end_id_banned()]
    if banned:  # min_tokens: end_id cannot come yet
        x = x.clone() if x is logits else x
        ii, cols = zip(*banned, strict=True)
        x[torch.tensor(ii, device=x.device), torch.tensor(cols, device=x.device)] = float("-inf")
    best, tokens = x.max(-1)
    ok = torch.isfinite(best)  # false only where every token is banned (a one-token vocabulary)
    logp = torch.log_softmax(x, dim=-1).gather(1, tokens[:, None])[:, 0]
    logp = torch.where(ok, logp, float("-inf"))
    tokens = torch.where(ok, tokens, NO_TOKEN)
    return tokens.tolist(), logp.tolist()


def sample(logits: torch.Tensor, rows: list[SequenceSampler]) -> tuple[list[int], list[float]]:
    """(B, V) logits, one sampler per row -> chosen tokens and their log-probabilities.

    The log-probability is that of the processed (temperature, penalties, bans) full distribution.
    A row whose every token is banned (bad words, min_tokens) gets NO_TOKEN. Greedy rows without penalties or
    bad words (min_tokens included: load tools ask for it on every request) run as one batch; the others row by row.
    """
    batched, alone = [], []
    for i, r in enumerate(rows):
        (batched if _batched(r) else alone).append(i)
    if not alone:
        return _sample_batched(logits, rows)
    out_tokens, out_logp = [0] * len(rows), [0.0] * len(rows)
    if batched:
        index = torch.tensor(batched, device=logits.device)
        toks, lps = _sample_batched(logits.index_select(0, index), [rows[i] for i in batched])
        for i, tok, lp in zip(batched, toks, lps, strict=True):
            out_tokens[i], out_logp[i] = tok, lp
    for i in alone:
        x = rows[i].process(logits[i])
        if not torch.isfinite(x.max()):  # every token banned: this row alone fails
            out_tokens[i], out_logp[i] = NO_TOKEN, float("-inf")
            continue
        tok = rows[i].pick(x)
        out_tokens[i], out_logp[i] = tok, float(torch.log_softmax(x, dim=-1)[tok])
    return out_tokens, out_logp
