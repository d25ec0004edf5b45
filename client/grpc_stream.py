"""gRPC streaming client (decoupled models): tritonclient.grpc start_stream / async_stream_infer.

The end of a request is the response whose `triton_final_response` parameter is true (asked for with
`enable_empty_final_response`, since a model may send the final flag on an empty response). Ctrl-C cancels
the request on the server (`stop_stream(cancel_requests=True)`) and re-raises.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from enginesmith.client.model_info import ModelInfo, grpc_model_info
from enginesmith.client.params import ClientError, GenerateParams, build_inputs
from enginesmith.client.result import Chunk, GenerateResult, chunk_from_outputs
from enginesmith.client.tokenizer import decoder, with_token_ids


def infer_inputs(tensors: dict[str, np.ndarray]) -> list[Any]:
    """name -> array into tritonclient.grpc InferInput objects (also what grpc.aio takes)."""
    from tritonclient.grpc import InferInput
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, arr in tensors.items():
        inp = InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def result_outputs(result: Any) -> dict[str, np.ndarray]:
    """All output tensors of one InferResult (empty for a flag-only final response).

    One pass over the response: numeric tensors are read straight from their raw contents (the per-name
    `as_numpy` searches the outputs again for every name, which shows at thousands of responses a second);
    BYTES, BF16 and typed (non-raw) contents go through tritonclient's own decoding."""
    resp = result.get_response()
    raw = resp.raw_output_contents
    out = {}
    for i, o in enumerate(resp.outputs):
        dtype = _RAW_DTYPES.get(o.datatype) if i < len(raw) else None
        if dtype is None:
            out[o.name] = result.as_numpy(o.name)
        else:
            out[o.name] = np.frombuffer(raw[i], dtype=dtype).reshape(tuple(o.shape))
    return out


_RAW_DTYPES = {"BOOL": np.dtype(bool), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
               "INT64": np.dtype("<i8"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
               "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "FP16": np.dtype("<f2"),
               "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}


def is_final(result: Any) -> bool:
    param = result.get_response().parameters.get("triton_final_response")
    return bool(param is not None and param.bool_param)


def prepare(params: GenerateParams, info: ModelInfo, tokenizer: Any) -> dict[str, np.ndarray]:
    """Validate `params` against the model and encode them as its input tensors."""
    if info.contract == "tokens":
        params = with_token_ids(params, tokenizer)
    return build_inputs(with_count_request(params, info), info.contract, info.batched, set(info.inputs))


def with_count_request(params: GenerateParams, info: ModelInfo) -> GenerateParams:
    """Ask a text model for its output token count when it can give one (a one-shot text has no other)."""
    declared = "return_num_output_tokens" in info.inputs
    if info.contract == "text" and params.return_num_output_tokens is None and declared:
        return GenerateParams(**{**params.__dict__, "return_num_output_tokens": True})
    return params


class GrpcStreamClient:
    """Streams one request at a time over a gRPC bidirectional stream."""

    def __init__(self, url: str, model: str = "ensemble", tokenizer: Any = None, verbose: bool = False):
        import tritonclient.grpc as grpcclient

        self.url, self.model, self.tokenizer = url, model, tokenizer
        self._client = grpcclient.InferenceServerClient(url, verbose=verbose)
        self.info = grpc_model_info(self._client, model)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GrpcStreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, params: GenerateParams, on_chunk: Callable[[Chunk, GenerateResult], None] | None = None,
                 timeout_s: float | None = None) -> GenerateResult:
        """Send `params`, collect every streamed response until the final one; Ctrl-C cancels."""
        tensors = prepare(params, self.info, self.tokenizer)
        rid = params.request_id or uuid.uuid4().hex[:16]
        responses: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: responses.put((time.monotonic_ns(), result, error)))
        res = GenerateResult(rid, self.model, "grpc-stream", decoder=decoder(self.tokenizer), streamed=params.stream)
        try:
            res.send_ns = time.monotonic_ns()
            self._client.async_stream_infer(self.model, infer_inputs(tensors), request_id=rid,
                                            enable_empty_final_response=True)
            self._collect(responses, res, on_chunk, timeout_s)
        except KeyboardInterrupt:
            res.cancelled = True
            self._client.stop_stream(cancel_requests=True)
            raise
        finally:
            self._client.stop_stream()
        res.done_ns = res.done_ns or time.monotonic_ns()
        return res

    def _collect(self, responses: queue.Queue, res: GenerateResult, on_chunk, timeout_s: float | None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:  # short waits keep the main thread responsive to Ctrl-C
                t_ns, result, error = responses.get(timeout=0.1)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    self._client.stop_stream(cancel_requests=True)
                    raise TimeoutError(f"request {res.request_id}: no final response within {timeout_s}s") from None
                continue
            if error is not None:
                raise ClientError(f"request {res.request_id} to {self.model!r}: {error}")
            res.server_request_id = result.get_response().id or res.server_request_id
            outputs = result_outputs(result)
            if outputs and (chunk := chunk_from_outputs(outputs, res, t_ns, self.info.contract)) is not None:
                res.chunks.append(chunk)
                if on_chunk is not None:
                    on_chunk(chunk, res)
            if is_final(result):
                res.done_ns = t_ns
                return
