"""HTTP client for Triton's generate extension (httpx): `/generate` (one JSON) and `/generate_stream` (SSE).

Every key of the JSON body that names a model input becomes that tensor; `id` becomes the request id. The
stream's HTTP status comes from the first response only, so each SSE event is checked for an `error` key.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from enginesmith.client.grpc_stream import with_count_request
from enginesmith.client.model_info import ModelInfo
from enginesmith.client.params import ClientError, GenerateParams, ServerUnreachable, build_inputs
from enginesmith.client.result import Chunk, GenerateResult, chunk_from_outputs
from enginesmith.client.tokenizer import decoder, with_token_ids

_LIST_INPUTS = {"stop_words", "bad_words", "input_ids", "sampling_param_stop", "stop_words_list", "bad_words_list"}
_NOT_OUTPUTS = {"model_name", "model_version", "id", "sequence_id", "sequence_start", "sequence_end"}


def _json_value(name: str, arr: np.ndarray) -> Any:
    flat = [x.decode() if isinstance(x, bytes) else x for x in arr.reshape(-1).tolist()]
    return flat if name in _LIST_INPUTS else flat[0]


def http_body(params: GenerateParams, info: ModelInfo, tokenizer: Any = None) -> dict[str, Any]:
    """The JSON body of a generate request, from the same tensors the gRPC clients send."""
    if info.contract == "tokens":
        params = with_token_ids(params, tokenizer)
        if params.stop_words_ids or params.bad_words_ids:
            raise ClientError("stop/bad words to the tensorrt_llm model over HTTP are not supported "
                              "(the generate extension takes scalars and 1-D lists): use gRPC streaming")
    tensors = build_inputs(with_count_request(params, info), info.contract, batched=False, accepted=set(info.inputs))
    body = {name: _json_value(name, arr) for name, arr in tensors.items()}
    if params.request_id:
        body["id"] = params.request_id
    return body


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse `data: {...}` server-sent events (blank line terminated, multi-line data joined)."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif not line.strip() and data:
            yield json.loads("\n".join(data))
            data = []
    if data:
        yield json.loads("\n".join(data))


class HttpClient:
    def __init__(self, base_url: str, model: str = "ensemble", tokenizer: Any = None, timeout_s: float = 300.0):
        import httpx

        self.base = base_url.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            self.base = "http://" + self.base
        self.model, self.tokenizer = model, tokenizer
        self._http = httpx.Client(timeout=timeout_s)
        try:
            r = self._http.get(f"{self.base}/v2/models/{model}/config")
        except httpx.TransportError as e:
            self._http.close()
            raise ServerUnreachable(f"the server at {self.base} is unreachable: {e}") from e
        if r.status_code != 200:
            raise ClientError(f"model {model!r} at {self.base}: HTTP {r.status_code} {_error_of(r.text)}")
        self.info = ModelInfo.from_config(r.json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _result(self, params: GenerateParams, protocol: str, streamed: bool) -> GenerateResult:
        rid = params.request_id or uuid.uuid4().hex[:16]
        return GenerateResult(rid, self.model, protocol, decoder=decoder(self.tokenizer), streamed=streamed)

    def generate(self, params: GenerateParams) -> GenerateResult:
        """POST /generate: exactly one response (stream=false)."""
        res = self._result(params, "http-generate", streamed=False)
        body = http_body(GenerateParams(**{**params.__dict__, "stream": False, "request_id": res.request_id}),
                         self.info, self.tokenizer)
        res.send_ns = time.monotonic_ns()
        r = self._http.post(f"{self.base}/v2/models/{self.model}/generate", json=body)
        res.done_ns = time.monotonic_ns()
        if r.status_code != 200:
            raise ClientError(f"request {res.request_id} to {self.model!r}: HTTP {r.status_code} {_error_of(r.text)}")
        if (chunk := self._chunk(r.json(), res, res.done_ns)) is not None:
            res.chunks.append(chunk)
        return res

    def generate_stream(self, params: GenerateParams,
                        on_chunk: Callable[[Chunk, GenerateResult], None] | None = None) -> GenerateResult:
        """POST /generate_stream: one SSE event per streamed response."""
        res = self._result(params, "http-generate-stream", streamed=params.stream)
        body = http_body(GenerateParams(**{**params.__dict__, "request_id": res.request_id}), self.info,
                         self.tokenizer)
        res.send_ns = time.monotonic_ns()
        url = f"{self.base}/v2/models/{self.model}/generate_stream"
        try:
            with self._http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    raise ClientError(f"request {res.request_id} to {self.model!r}: HTTP {r.status_code} "
                                      f"{_error_of(r.read().decode())}")
                for event in sse_events(r.iter_lines()):
                    chunk = self._chunk(event, res, time.monotonic_ns())
                    if chunk is None:
                        continue
                    res.chunks.append(chunk)
                    if on_chunk is not None:
                        on_chunk(chunk, res)
        except KeyboardInterrupt:  # closing the connection cancels the request on the server
            res.cancelled = True
            raise
        res.done_ns = time.monotonic_ns()
        return res

    def _chunk(self, event: dict[str, Any], res: GenerateResult, t_ns: int) -> Chunk | None:
        if "error" in event:
            raise ClientError(f"request {res.request_id} to {self.model!r}: {event['error']}")
        res.server_request_id = str(event.get("id", res.server_request_id))
        outputs = {k: v for k, v in event.items() if k not in _NOT_OUTPUTS}
        return chunk_from_outputs(outputs, res, t_ns, self.info.contract)


def _error_of(text: str) -> str:
    try:
        return json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        return text.strip()
