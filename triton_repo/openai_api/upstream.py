"""The Triton model behind the front, over one shared `tritonclient.grpc.aio` channel: one bidirectional
stream per request (decoupled models stream a response per token); leaving the stream early cancels the
request on the server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from enginesmith.client.grpc_stream import infer_inputs, result_outputs
from enginesmith.client.model_info import ModelInfo, grpc_aio_model_info
from enginesmith.client.params import ClientError

CONTRACT_OUTPUTS = {"tokens": ("output_ids",), "text": ("text_output", "num_input_tokens", "num_output_tokens")}


class UpstreamError(Exception):
    """The Triton model failed a request, or Triton could not be reached."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class TritonUpstream:
    def __init__(self, grpc_url: str, model: str = "tensorrt_llm"):
        self.grpc_url, self.model = grpc_url, model
        self.client: Any = None
        self.info: ModelInfo | None = None
        self.outputs: list[Any] | None = None

    async def open(self) -> TritonUpstream:
        import tritonclient.grpc.aio as grpcaio
        from tritonclient.grpc import InferRequestedOutput

        self.client = grpcaio.InferenceServerClient(self.grpc_url)
        self.info = await grpc_aio_model_info(self.client, self.model)
        if self.info.contract not in CONTRACT_OUTPUTS:
            raise ClientError(f"model {self.model!r} speaks the {self.info.contract} contract; the OpenAI front "
                              "fronts tensorrt_llm (token ids) or the ensemble / tensorrt_llm_bls (text)")
        self.outputs = [InferRequestedOutput(n) for n in CONTRACT_OUTPUTS[self.info.contract]
                        if n in self.info.outputs]
        return self

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - any failure to ask means not ready
            return False

    async def responses(self, tensors: dict[str, np.ndarray], request_id: str) -> AsyncIterator[dict[str, Any]]:
        """The output tensors of every response to one request; closing the iterator early cancels it."""
        import grpc

        inputs = infer_inputs(tensors)

        async def one_request():
            yield {"model_name": self.model, "inputs": inputs, "request_id": request_id, "outputs": self.outputs}

        stream = self.client.stream_infer(one_request())
        try:
            async for result, error in stream:
                if error is not None:
                    raise UpstreamError(f"Triton model {self.model!r} failed request {request_id}: {error.message()}")
                yield result_outputs(result)
        except grpc.aio.AioRpcError as e:
            status = 503 if e.code() == grpc.StatusCode.UNAVAILABLE else 500
            raise UpstreamError(f"Triton at {self.grpc_url} ({self.model!r}): {e.details()}", status) from None
        finally:
            stream.cancel()  # a no-op once the stream has ended; otherwise the server stops the request
