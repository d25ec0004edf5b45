"""What came back for one request: the text/tokens, every streamed chunk's arrival, and server timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enginesmith.client.params import TIME_OUTPUTS, ClientError


@dataclass
class Chunk:
    t_ns: int
    """Client steady-clock time (time.monotonic_ns) when the response arrived."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)


@dataclass
class GenerateResult:
    request_id: str
    model: str
    protocol: str
    send_ns: int = field(default_factory=time.monotonic_ns)
    done_ns: int = 0
    chunks: list[Chunk] = field(default_factory=list)
    server_times_ns: dict[str, int] = field(default_factory=dict)
    """arrival / first_scheduled / first_token / last_token, when the model returns them (its steady clock)."""
    outputs: dict[str, Any] = field(default_factory=dict)
    """Other outputs of the last response that carried them (cum_log_probs, num_output_tokens, ...)."""
    cancelled: bool = False
    server_request_id: str = ""
    """The id the server's responses carry (Triton echoes the request id)."""
    streamed: bool = True
    """One response per token (stream=true); false: a single response carries the whole output."""
    decoder: Callable[[list[int]], str] | None = field(default=None, repr=False)
    """Token ids -> text (the `tokens` contract); decoding all ids at once keeps spaces and UTF-8 intact."""

    @property
    def text(self) -> str:
        if self.decoder is not None and any(c.token_ids for c in self.chunks):
            return self.decoder(self.token_ids)
        return "".join(c.text for c in self.chunks)

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def num_output_tokens(self) -> int | None:
        """Token ids when the model returns them; else the count it reports; else one per streamed response
        (a streaming LLM model sends one response per token); unknown for a one-shot text response."""
        if any(c.token_ids for c in self.chunks):
            return len(self.token_ids)
        if "num_output_tokens" in self.outputs:
            return int(np.asarray(self.outputs["num_output_tokens"]).reshape(-1)[0])
        if self.streamed:
            return len(self.chunks)
        return None

    @property
    def ttft_s(self) -> float | None:
        return (self.chunks[0].t_ns - self.send_ns) / 1e9 if self.chunks else None

    @property
    def e2e_s(self) -> float:
        return (self.done_ns - self.send_ns) / 1e9

    @property
    def itls_s(self) -> list[float]:
        return [(b.t_ns - a.t_ns) / 1e9 for a, b in zip(self.chunks, self.chunks[1:], strict=False)]

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "model": self.model, "protocol": self.protocol, "text": self.text,
            "token_ids": self.token_ids, "num_output_tokens": self.num_output_tokens, "num_chunks": len(self.chunks),
            "ttft_s": self.ttft_s, "e2e_s": self.e2e_s, "itls_s": self.itls_s, "cancelled": self.cancelled,
            "server_request_id": self.server_request_id, "streamed": self.streamed,
            "server_times_ns": self.server_times_ns,
            "outputs": {k: np.asarray(v).tolist() for k, v in self.outputs.items()},
        }


def _decode_text(value: Any) -> str:
    arr = np.asarray(value, dtype=object).reshape(-1)
    return "".join(x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in arr)


def chunk_from_outputs(outputs: dict[str, Any], result: GenerateResult, t_ns: int, contract: str) -> Chunk | None:
    """Fold one response's outputs (name -> array or JSON value) into `result`; returns the new chunk (None for
    a tensorrt_llm response without tokens: the final one of a stream that ended at end_id or was cancelled)."""
    for name in TIME_OUTPUTS:
        if name in outputs:
            result.server_times_ns[name] = int(np.asarray(outputs[name]).reshape(-1)[0])
    for name, value in outputs.items():
        if name not in TIME_OUTPUTS and name not in ("text_output", "output_ids"):
            result.outputs[name] = value
    if contract == "tokens":
        if "output_ids" not in outputs:
            raise ClientError(f"response of {result.model!r} has no output_ids (outputs: {sorted(outputs)})")
        ids = np.atleast_1d(np.asarray(outputs["output_ids"], dtype=np.int64))  # HTTP JSON: one id is a scalar
        ids = ids.reshape(-1, ids.shape[-1])[0] if ids.ndim > 1 else ids  # beam 0
        ids = [int(x) for x in ids if x >= 0]
        return Chunk(t_ns, "", ids) if ids else None
    if "text_output" not in outputs:
        raise ClientError(f"response of {result.model!r} has no text_output (outputs: {sorted(outputs)})")
    return Chunk(t_ns, _decode_text(outputs["text_output"]))
