"""One OpenAI request run against the Triton model: sampling fields mapped to its inputs, streamed text
deltas (incremental detokenization, stop strings), then the finish reason and the token counts."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enginesmith.client.grpc_stream import prepare
from enginesmith.client.params import ClientError, GenerateParams
from enginesmith.triton_repo.detokenize import BatchDecode, IncrementalDetokenizer
from enginesmith.triton_repo.openai_api.errors import bad_request
from enginesmith.triton_repo.openai_api.schemas import _Common
from enginesmith.triton_repo.openai_api.stops import StopText
from enginesmith.triton_repo.openai_api.upstream import TritonUpstream


def batch_decoder(tokenizer: Any) -> BatchDecode:
    """Ids -> text as `tokenizer.batch_decode(..., skip_special_tokens=True)` gives it; straight through the
    Rust tokenizer when that is the same (a fast tokenizer that cleans up no spaces): ~4x cheaper per token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True)
    return lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=True)


@dataclass
class Prompt:
    ids: list[int]
    """What the tensorrt_llm model gets (and the prompt's token count)."""
    text: str = ""
    """What a text model (ensemble, BLS) gets; "" for a prompt given as token ids."""


def sampling_fields(req: _Common, max_tokens: int) -> dict[str, Any]:
    """OpenAI sampling -> GenerateParams fields. temperature 0 is greedy (top_k 1, as TensorRT-LLM reads
    it); otherwise OpenAI's defaults (temperature 1, top_p 1) are sent, with a fresh seed unless one is given,
    so repeated requests differ as they do on OpenAI."""
    out: dict[str, Any] = {}
    if req.temperature == 0:
        out["top_k"] = 1
    else:
        out.update(temperature=1.0 if req.temperature is None else req.temperature,
                   top_p=1.0 if req.top_p is None else req.top_p,
                   seed=random.getrandbits(31) if req.seed is None else req.seed)
        if req.top_k:
            out["top_k"] = req.top_k
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            out[name] = getattr(req, name)
    if req.repetition_penalty is not None:
        out["repetition_penalty"] = req.repetition_penalty
    min_tokens = max_tokens if req.ignore_eos else req.min_tokens
    if min_tokens:
        out["min_tokens"] = min(min_tokens, max_tokens)
    return out


@dataclass
class Generation:
    upstream: TritonUpstream
    tokenizer: Any
    request_id: str
    prompt: Prompt
    max_tokens: int
    stream: bool
    stops: list[str]
    sampling: dict[str, Any]
    decode: BatchDecode | None = None
    """Default: batch_decoder(tokenizer)."""
    finish_reason: str | None = None
    tail: str = ""
    """Text held back until the end (set with finish_reason); it goes out with the finish reason."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _end_id: int | None = field(default=None, repr=False)
    _tensors: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def prepare(self) -> Generation:
        """Encode the model's input tensors now, so a parameter it cannot take is a 400 before anything is sent."""
        self._tensors = self._tensors or self.tensors()
        return self

    def tensors(self) -> dict[str, np.ndarray]:
        """The model's input tensors; a parameter it cannot take becomes a 400."""
        info = self.upstream.info
        tokens = info.contract == "tokens"
        if not tokens and not self.prompt.text:
            raise bad_request(f"prompt: token-id prompts need the tensorrt_llm model behind the front, not "
                              f"{self.upstream.model!r} (text in)", "prompt")
        self.prompt_tokens = len(self.prompt.ids)  # a text model may report its own count
        extra = dict(exclude_input_in_output=True) if tokens else dict(return_num_input_tokens=True)
        params = GenerateParams(text=self.prompt.text, input_ids=self.prompt.ids if tokens else None,
                                max_tokens=self.max_tokens,
                                stream=self.stream, stop_words=list(self.stops), request_id=self.request_id,
                                **self.sampling, **{k: v for k, v in extra.items() if k in info.inputs})
        try:
            tensors = prepare(params, info, self.tokenizer)
        except ClientError as e:
            raise bad_request(str(e)) from None
        if tokens and "end_id" in tensors:
            self._end_id = int(np.asarray(tensors["end_id"]).reshape(-1)[0])
        return tensors

    async def deltas(self) -> AsyncIterator[str]:
        """Text as it is generated: one delta per response of the model, "" while text is held back (an
        incomplete character, the beginning of a stop string), as vLLM streams. Once it ends, `tail` (what
        was held back), `finish_reason` and the token counts are set."""
        tensors = self.prepare()._tensors
        tokens = self.upstream.info.contract == "tokens"
        detok = IncrementalDetokenizer(self.decode or batch_decoder(self.tokenizer))
        stop, ended = StopText(self.stops), False
        responses = self.upstream.responses(tensors, self.request_id)
        try:
            async for outputs in responses:
                if tokens:
                    ids, ended = self._ids(outputs)
                    self.completion_tokens += len(ids)
                    text = stop.push(detok.push(ids))
                else:
                    text = stop.push(self._text(outputs))
                if stop.matched is not None or ended:
                    if text:
                        yield text
                    break
                yield text
        finally:
            await responses.aclose()  # cancels the request on the server if it is still generating
        if stop.matched is None:
            self.tail = stop.push(detok.flush()) if tokens else ""
            self.tail += stop.flush()
        by_length = self.completion_tokens >= self.max_tokens and stop.matched is None and not ended
        self.finish_reason = "length" if by_length else "stop"

    def _ids(self, outputs: dict[str, Any]) -> tuple[list[int], bool]:
        """Beam 0's new ids, cut at end_id (an engine that returns it); and whether it was there."""
        arr = outputs.get("output_ids")
        ids = [] if arr is None or not arr.size else [x for x in arr.reshape(-1, arr.shape[-1])[0].tolist() if x >= 0]
        if self._end_id is not None and self._end_id in ids:
            return ids[: ids.index(self._end_id)], True
        return ids, False

    def _text(self, outputs: dict[str, Any]) -> str:
        for name, attr in (("num_input_tokens", "prompt_tokens"), ("num_output_tokens", "completion_tokens")):
            if name in outputs:
                setattr(self, attr, int(np.asarray(outputs[name]).reshape(-1)[0]))
        if "text_output" not in outputs:
            return ""
        arr = np.asarray(outputs["text_output"], dtype=object).reshape(-1)
        return "".join(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr)
