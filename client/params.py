"""One generation request, and its encoding for each Triton LLM model contract.

Contracts (detected from the model's inputs, see `contract_of`):
- `text`: the ensemble / tensorrt_llm_bls (`text_input`, `max_tokens`, `stream`, `top_k`, `stop_words`, ...).
- `tokens`: the `tensorrt_llm` model itself (`input_ids`, `request_output_len`, `streaming`, `runtime_top_k`,
  `stop_words_list` as [2, n] ids, ...): exact token counts, no server-side tokenizer in the path.
- `llmapi`: the LLM-API `tensorrt_llm` model (`text_input`, `sampling_param_*`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# field -> (text name, tokens name, llmapi name, numpy dtype); None: the contract has no such input.
_SAMPLING: dict[str, tuple[str | None, str | None, str | None, Any]] = {
    "temperature": ("temperature", "temperature", "sampling_param_temperature", np.float32),
    "top_k": ("top_k", "runtime_top_k", "sampling_param_top_k", np.int32),
    "top_p": ("top_p", "runtime_top_p", "sampling_param_top_p", np.float32),
    "length_penalty": ("length_penalty", "len_penalty", None, np.float32),
    "repetition_penalty": ("repetition_penalty", "repetition_penalty", None, np.float32),
    "presence_penalty": ("presence_penalty", "presence_penalty", "sampling_param_presence_penalty", np.float32),
    "frequency_penalty": ("frequency_penalty", "frequency_penalty", "sampling_param_frequency_penalty",
                          np.float32),
    "min_tokens": ("min_tokens", "min_tokens", None, np.int32),
    "seed": ("seed", "seed", "sampling_param_seed", np.uint64),
    "beam_width": ("beam_width", "beam_width", None, np.int32),
    "num_return_sequences": ("num_return_sequences", "num_return_sequences", None, np.int32),
    "end_id": ("end_id", "end_id", None, np.int32),
    "pad_id": ("pad_id", "pad_id", None, np.int32),
    "exclude_input_in_output": ("exclude_input_in_output", "exclude_input_in_output",
                                "sampling_param_exclude_input_from_output", np.bool_),
    "return_log_probs": ("return_log_probs", "return_log_probs", None, np.bool_),
    "return_perf_metrics": ("return_perf_metrics", "return_perf_metrics", "sampling_param_return_perf_metrics",
                            np.bool_),
    "return_num_input_tokens": ("return_num_input_tokens", "return_num_input_tokens", None, np.bool_),
    "return_num_output_tokens": ("return_num_output_tokens", "return_num_output_tokens", None, np.bool_),
}
_COLUMN = {"text": 0, "tokens": 1, "llmapi": 2}
INT32_MAX = 2**31 - 1
TIME_OUTPUTS = ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")


class ClientError(ValueError):
    """A request the model cannot take, or a response that is not what the contract says."""


class ServerUnreachable(ConnectionError):
    """No server answers at the address (not up, or another address)."""


@dataclass
class GenerateParams:
    """What to generate; None leaves a sampling input unsent so the model's default applies."""

    text: str = ""
    """The prompt (text contracts). For the `tokens` contract give `input_ids` (or a tokenizer to the client)."""
    max_tokens: int = 16
    stream: bool = True
    input_ids: list[int] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    length_penalty: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    seed: int | None = None
    beam_width: int | None = None
    num_return_sequences: int | None = None
    end_id: int | None = None
    pad_id: int | None = None
    exclude_input_in_output: bool | None = None
    return_log_probs: bool | None = None
    return_perf_metrics: bool | None = None
    return_num_input_tokens: bool | None = None
    return_num_output_tokens: bool | None = None
    stop_words: list[str] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    stop_words_ids: list[list[int]] | None = None
    """Stop sequences as token ids (the `tokens` contract); the client fills it from `stop_words`."""
    bad_words_ids: list[list[int]] | None = None
    request_id: str = ""

    def validate(self) -> None:
        """Refuse what the model's tensors cannot carry (Triton's HTTP endpoint would wrap an INT32 silently)."""
        if not 1 <= self.max_tokens <= INT32_MAX:
            raise ClientError(f"max_tokens={self.max_tokens}: must be within [1, {INT32_MAX}]")
        if not self.text and not self.input_ids:
            raise ClientError("empty prompt: give text (or input_ids for the tensorrt_llm model)")
        for name in ("top_k", "min_tokens", "beam_width", "num_return_sequences"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= INT32_MAX:
                raise ClientError(f"{name}={v}: must be within [0, {INT32_MAX}]")
        for name in ("end_id", "pad_id"):
            v = getattr(self, name)
            if v is not None and not -INT32_MAX - 1 <= v <= INT32_MAX:
                raise ClientError(f"{name}={v}: must fit INT32 [{-INT32_MAX - 1}, {INT32_MAX}]")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ClientError(f"seed={self.seed}: must be within [0, 2^64 - 1]")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ClientError(f"top_p={self.top_p}: must be within [0, 1]")
        if self.temperature is not None and self.temperature < 0:
            raise ClientError(f"temperature={self.temperature}: must be >= 0")

    def sampling(self) -> dict[str, Any]:
        """The sampling fields that are set."""
        return {k: getattr(self, k) for k in _SAMPLING if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], "")}


def contract_of(input_names: set[str], model: str = "") -> str:
    """Which LLM contract a model's declared inputs speak."""
    if "sampling_param_max_tokens" in input_names:
        return "llmapi"
    if "text_input" in input_names:
        return "text"
    if "input_ids" in input_names:
        return "tokens"
    raise ClientError(f"model {model!r} takes none of text_input / input_ids: not an LLM model "
                      f"(inputs: {sorted(input_names)})")


def pack_words(words: list[list[int]]) -> np.ndarray:
    """Stop/bad word id lists -> the [1, 2, n] layout of upstream (flat ids; end offsets padded with -1)."""
    flat = [t for w in words for t in w]
    offsets = np.cumsum([len(w) for w in words]).tolist()
    n = max(len(flat), 1)
    out = np.full((1, 2, n), -1, dtype=np.int32)
    out[0, 0, : len(flat)] = flat
    out[0, 1, : len(offsets)] = offsets
    out[0, 0, len(flat):] = 0
    return out


def build_inputs(p: GenerateParams, contract: str, batched: bool,
                 accepted: set[str] | None = None) -> dict[str, np.ndarray]:
    """Input tensors (name -> array, batch dim added when `batched`) for `contract`.

    Every set field must be an input the model declares (`accepted`); otherwise the request is refused
    rather than sent without it.
    """
    p.validate()
    col = _COLUMN[contract]
    scalar = (lambda v, dt: np.array([[v]], dtype=dt)) if batched else (lambda v, dt: np.array([v], dtype=dt))
    vector = (lambda v, dt: np.array([v], dtype=dt)) if batched else (lambda v, dt: np.array(v, dtype=dt))
    t: dict[str, np.ndarray] = {}
    if contract == "tokens":
        if not p.input_ids:
            raise ClientError("the tensorrt_llm (tokens) model needs input_ids: pass a tokenizer or token ids")
        t["input_ids"] = vector(p.input_ids, np.int32)
        t["input_lengths"] = scalar(len(p.input_ids), np.int32)
        t["request_output_len"] = scalar(p.max_tokens, np.int32)
        t["streaming"] = scalar(p.stream, np.bool_)
        if p.stop_words or p.bad_words:
            raise ClientError("stop/bad words for the tensorrt_llm model must be token ids: pass a tokenizer")
        for name, ids in (("stop_words_list", p.stop_words_ids), ("bad_words_list", p.bad_words_ids)):
            if ids:
                t[name] = pack_words(ids) if batched else pack_words(ids)[0]
    else:
        t["text_input"] = vector([p.text.encode()], object) if contract == "llmapi" else scalar(p.text.encode(), object)
        if contract == "llmapi":
            t["sampling_param_max_tokens"] = scalar(p.max_tokens, np.int32)
            t["streaming"] = scalar(p.stream, np.bool_)
            if p.stop_words:
                t["sampling_param_stop"] = vector([w.encode() for w in p.stop_words], object)
        else:
            t["max_tokens"] = scalar(p.max_tokens, np.int32)
            t["stream"] = scalar(p.stream, np.bool_)
            for name, words in (("stop_words", p.stop_words), ("bad_words", p.bad_words)):
                if words:
                    t[name] = vector([w.encode() for w in words], object)
    for key, value in p.sampling().items():
        name, dtype = _SAMPLING[key][col], _SAMPLING[key][3]
        if name is None:
            raise ClientError(f"{key} is not an input of the {contract} contract: leave it unset")
        t[name] = scalar(value, dtype)
    if accepted is not None:
        unknown = sorted(set(t) - accepted)
        if unknown:
            raise ClientError(f"the model does not declare input(s) {unknown}: leave the matching "
                              f"parameter(s) unset, or use a model that takes them (accepted: {sorted(accepted)})")
    return t
