"""The upstream `tensorrt_llm` Triton model's tensor contract, in plain numpy.

`parse_rows` turns a request's input tensors (batch dimension first, as Triton hands them to a model
with max_batch_size > 0) into one `RowSpec` per batch row; `response_arrays` builds the output
tensors of one response. Names, dtypes and shapes follow tensorrt_llm/config.pbtxt upstream.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from enginesmith.runtime.engine.request import Request, RequestError
from enginesmith.runtime.engine.sampler import SamplingParams

# Inputs that would change the result if ignored, and which the reference runtime does not implement.
UNSUPPORTED = ("prompt_embedding_table", "lora_task_id", "lora_weights", "lora_config", "draft_input_ids",
               "draft_logits", "encoder_input_features", "guided_decoding_guide_type", "guided_decoding_guide",
               "mrope_rotary_cos_sin", "cross_attention_mask")
UNSUPPORTED_FLAGS = ("return_context_logits", "return_generation_logits")


@dataclass(frozen=True, slots=True)
class RowSpec:
    """One batch row of a Triton request, ready to become an engine Request."""

    batch_index: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    streaming: bool
    exclude_input_in_output: bool
    return_log_probs: bool
    return_num_tokens: tuple[bool, bool]
    """(return_num_input_tokens, return_num_output_tokens)."""
    return_perf_metrics: bool = False


class _Inputs:
    """Typed access to batch row `b` of the input tensors."""

    def __init__(self, tensors: dict[str, np.ndarray], batch: int):
        self.t, self.batch = tensors, batch
        for name, arr in tensors.items():
            if arr.ndim == 0 or arr.shape[0] != batch:
                raise RequestError(f"{name} has batch size {arr.shape[0] if arr.ndim else 0} but input_ids has "
                                   f"{batch}: send one row per prompt")

    def scalar(self, name: str, b: int, default=None):
        arr = self.t.get(name)
        if arr is None or arr[b].size == 0:
            return default
        if arr[b].size != 1:
            raise RequestError(f"{name} must hold one value per batch row, got shape {list(arr.shape)}")
        return arr[b].reshape(-1)[0].item()

    def words(self, name: str, b: int) -> tuple[tuple[int, ...], ...]:
        arr = self.t.get(name)
        return () if arr is None else parse_word_list(arr[b], name)


def parse_word_list(arr: np.ndarray, name: str = "stop_words_list") -> tuple[tuple[int, ...], ...]:
    """Upstream's [2, n] word list: row 0 the concatenated token ids, row 1 each word's end offset, -1 padded."""
    if arr.size == 0:
        return ()
    if arr.ndim != 2 or arr.shape[0] != 2:
        raise RequestError(f"{name} must have shape [batch, 2, n] (ids row + offsets row), got row shape "
                           f"{list(arr.shape)}")
    ids, offsets = arr[0].tolist(), [int(o) for o in arr[1] if o >= 0]
    words, start = [], 0
    for end in offsets:
        if not start < end <= len(ids):
            raise RequestError(f"{name} offsets {offsets} do not split its {len(ids)} token ids into words")
        words.append(tuple(int(t) for t in ids[start:end]))
        start = end
    return tuple(words)


def parse_rows(tensors: dict[str, np.ndarray], *, decoupled: bool, exclude_input_default: bool) -> list[RowSpec]:
    """Validate the request's inputs and split them into batch rows (raises RequestError)."""
    ids = tensors.get("input_ids")
    if ids is None:
        raise RequestError("input_ids is required")
    if ids.ndim != 2:
        raise RequestError(f"input_ids must have shape [batch, tokens], got {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise RequestError(f"input_ids must be INT32, got {ids.dtype}")
    batch = ids.shape[0]
    if batch > 1 and not decoupled:
        raise RequestError("batch size > 1 requires the tensorrt_llm model to use the decoupled transaction policy")
    inputs = _Inputs(tensors, batch)
    _reject_unsupported(inputs)
    return [_row(inputs, ids, b, decoupled, exclude_input_default) for b in range(batch)]


def _reject_unsupported(inputs: _Inputs) -> None:
    for name in UNSUPPORTED:
        if name in inputs.t and inputs.t[name].size:
            raise RequestError(f"{name} is not supported by the reference runtime: leave it out")
    for name in UNSUPPORTED_FLAGS:
        if any(inputs.scalar(name, b, False) for b in range(inputs.batch)):
            raise RequestError(f"{name}=true is not supported by the reference runtime")
    bias = inputs.t.get("embedding_bias")
    if bias is not None and np.any(bias):
        raise RequestError("a non-zero embedding_bias is not supported by the reference runtime")


def _row(inputs: _Inputs, ids: np.ndarray, b: int, decoupled: bool, exclude_default: bool) -> RowSpec:
    s = inputs.scalar
    length = s("input_lengths", b, ids.shape[1])
    if not 0 <= length <= ids.shape[1]:
        raise RequestError(f"input_lengths={length} is outside [0, {ids.shape[1]}] (the width of input_ids)")
    max_new = s("request_output_len", b)
    if max_new is None:
        raise RequestError("request_output_len is required")
    streaming = bool(s("streaming", b, False))
    if streaming and not decoupled:
        raise RequestError("streaming=true requires the tensorrt_llm model to be decoupled "
                           "(model_transaction_policy { decoupled: true })")
    for name in ("beam_width", "num_return_sequences"):
        if s(name, b, 1) != 1:
            raise RequestError(f"{name}={s(name, b)}: the reference runtime supports 1 only")
    end_id = s("end_id", b)
    sampling = SamplingParams(
        temperature=float(s("temperature", b, 1.0)), top_k=int(s("runtime_top_k", b, 0)),
        top_p=float(s("runtime_top_p", b, 0.0)), seed=int(s("seed", b, s("random_seed", b, 0))),
        repetition_penalty=float(s("repetition_penalty", b, 1.0)),
        presence_penalty=float(s("presence_penalty", b, 0.0)),
        frequency_penalty=float(s("frequency_penalty", b, 0.0)),
        min_tokens=int(s("min_tokens", b, s("min_length", b, 0))),
        end_id=None if end_id is None or end_id < 0 else int(end_id),
        stop_words=inputs.words("stop_words_list", b), bad_words=inputs.words("bad_words_list", b))
    return RowSpec(
        batch_index=b, prompt=[int(t) for t in ids[b, :length]], max_new_tokens=int(max_new), sampling=sampling,
        streaming=streaming, exclude_input_in_output=bool(s("exclude_input_in_output", b, exclude_default)),
        return_log_probs=bool(s("return_log_probs", b, False)),
        return_num_tokens=(bool(s("return_num_input_tokens", b, False)),
                           bool(s("return_num_output_tokens", b, False))),
        return_perf_metrics=bool(s("return_perf_metrics", b, False)))


PERF_OUTPUTS: dict[str, type] = {
    "kv_cache_alloc_new_blocks": np.int32, "kv_cache_reused_blocks": np.int32, "kv_cache_alloc_total_blocks": np.int32,
    "arrival_time_ns": np.int64, "first_scheduled_time_ns": np.int64, "first_token_time_ns": np.int64,
    "last_token_time_ns": np.int64,
    "acceptance_rate": np.float32, "total_accepted_draft_tokens": np.int32, "total_draft_tokens": np.int32,
}
"""What `return_perf_metrics` returns, as upstream's backend does (each [1, 1])."""


def perf_metrics(req: Request) -> dict[str, int | float]:
    """A request's perf outputs: its KV blocks (new, reused from the prefix cache, both), its steady-clock times,
    and zeros for speculative decoding, which the reference runtime does not do."""
    return {"kv_cache_alloc_new_blocks": req.kv_new_blocks, "kv_cache_reused_blocks": req.kv_reused_blocks,
            "kv_cache_alloc_total_blocks": req.kv_new_blocks + req.kv_reused_blocks,
            "arrival_time_ns": req.arrival_ns, "first_scheduled_time_ns": req.first_scheduled_ns,
            "first_token_time_ns": req.first_token_ns, "last_token_time_ns": req.last_token_ns,
            "acceptance_rate": 0.0, "total_accepted_draft_tokens": 0, "total_draft_tokens": 0}


def response_arrays(spec: RowSpec, req: Request, tokens: list[int], log_probs: list[float],
                    names: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Output tensors of one response (batch 1, beam 1) of row `spec`: `tokens` are what this response carries;
    `names`: only these outputs (None: every one the row asked for). Shapes are upstream's: output_ids [1, 1, n],
    output_log_probs [1, 1, n], every other output [1, 1]."""
    def want(name: str) -> bool:
        return names is None or name in names

    out = {}
    if want("output_ids"):
        out["output_ids"] = np.asarray(tokens, dtype=np.int32).reshape(1, 1, -1)
    if want("sequence_length"):
        out["sequence_length"] = np.array([[len(tokens)]], dtype=np.int32)
    if want("batch_index"):
        out["batch_index"] = np.array([[spec.batch_index]], dtype=np.int32)
    if want("sequence_index"):
        out["sequence_index"] = np.zeros((1, 1), dtype=np.int32)
    if spec.return_log_probs and want("cum_log_probs"):
        out["cum_log_probs"] = np.array([[sum(req.log_probs)]], dtype=np.float32)
    if spec.return_log_probs and want("output_log_probs"):
        out["output_log_probs"] = np.asarray(log_probs, dtype=np.float32).reshape(1, 1, -1)
    if spec.return_perf_metrics and (names is None or not PERF_OUTPUTS.keys().isdisjoint(names)):
        out.update({name: np.array([[value]], dtype=PERF_OUTPUTS[name])
                    for name, value in perf_metrics(req).items() if want(name)})
    if spec.return_num_tokens[0] and want("num_input_tokens"):
        out["num_input_tokens"] = np.array([[len(req.prompt)]], dtype=np.int32)
    if spec.return_num_tokens[1] and want("num_output_tokens"):
        out["num_output_tokens"] = np.array([[len(req.output)]], dtype=np.int32)
    return out
