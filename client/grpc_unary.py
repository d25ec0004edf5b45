"""gRPC unary inference (ModelInfer) for non-decoupled models: one request, one response."""

from __future__ import annotations

import time
import uuid
from typing import Any

from enginesmith.client.grpc_stream import infer_inputs, prepare, result_outputs
from enginesmith.client.model_info import grpc_model_info
from enginesmith.client.params import ClientError, GenerateParams
from enginesmith.client.result import GenerateResult, chunk_from_outputs
from enginesmith.client.tokenizer import decoder


def grpc_generate(url: str, model: str, params: GenerateParams, tokenizer: Any = None,
                  timeout_s: float | None = None) -> GenerateResult:
    """One ModelInfer call; decoupled models are refused up front (they need the stream or generate_stream)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(url) as client:
        info = grpc_model_info(client, model)
        if info.decoupled:
            raise ClientError(f"model {model!r} is decoupled: gRPC unary cannot serve it; use "
                              "`enginesmith client stream` (gRPC streaming) or `client http --stream`")
        tensors = prepare(GenerateParams(**{**params.__dict__, "stream": False}), info, tokenizer)
        rid = params.request_id or uuid.uuid4().hex[:16]
        res = GenerateResult(rid, model, "grpc-unary", decoder=decoder(tokenizer), streamed=False)
        try:
            result = client.infer(model, infer_inputs(tensors), request_id=rid,
                                  client_timeout=timeout_s)
        except InferenceServerException as e:
            raise ClientError(f"request {rid} to {model!r}: {e.message()}") from e
        res.done_ns = time.monotonic_ns()
        res.server_request_id = result.get_response().id
        if (chunk := chunk_from_outputs(result_outputs(result), res, res.done_ns, info.contract)) is not None:
            res.chunks.append(chunk)
        return res
