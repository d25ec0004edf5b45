"""The FastAPI app: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (whole or streamed as SSE) and
`/health`, over one Triton model. Errors are OpenAI-shaped; a client that disconnects cancels its request
on the server (streamed or not)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from triton_repo.openai_api.errors import ApiError, bad_request, model_not_found
from triton_repo.openai_api.generation import Generation, Prompt, batch_decoder, sampling_fields
from triton_repo.openai_api.prompts import Limits, Prompter
from triton_repo.openai_api.schemas import ChatCompletionRequest, CompletionRequest, parse
from triton_repo.openai_api.streaming import EventStream, Shape, sse_events
from triton_repo.openai_api.upstream import TritonUpstream, UpstreamError

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left


@dataclass(frozen=True)
class FrontConfig:
    model_name: str
    """The name clients use (the recipe's name)."""
    triton_grpc_url: str
    tokenizer_dir: Path
    limits: Limits
    triton_model: str = "tensorrt_llm"
    """tensorrt_llm (token ids in and out; the front tokenizes) or ensemble / tensorrt_llm_bls (text)."""


def create_app(cfg: FrontConfig, tokenizer: Any = None) -> FastAPI:
    if tokenizer is None:
        from client.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer_dir)
    prompter, decode = Prompter(tokenizer, cfg.limits), batch_decoder(tokenizer)
    upstream = TritonUpstream(cfg.triton_grpc_url, cfg.triton_model)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await upstream.open()
        except Exception as e:
            app.state.startup_error = str(e)  # the runner reports it
            raise
        try:
            yield
        finally:
            await upstream.close()

    app = FastAPI(title=f"enginesmith OpenAI front: {cfg.model_name}", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.upstream = upstream

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(UpstreamError)
    async def upstream_error(_request: Request, e: UpstreamError) -> JSONResponse:
        return JSONResponse(ApiError(e.status, str(e)).body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), None, code).body(), status_code=e.status_code)

    def model_card() -> dict[str, Any]:
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "enginesmith"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != cfg.model_name:
            raise model_not_found(model_id, cfg.model_name)
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = await upstream.ready()
        return JSONResponse({"status": "ok" if ok else f"Triton model {cfg.triton_model!r} is not ready"},
                            status_code=200 if ok else 503)

    async def generate(request: Request, chat: bool):
        req = parse(ChatCompletionRequest if chat else CompletionRequest, await _json(request))
        if req.model != cfg.model_name:
            raise model_not_found(req.model, cfg.model_name)
        stops = req.stop_strings()
        if chat:
            text, ids = prompter.chat_prompt(req.message_dicts())
            requested, default, what = req.max_completion_tokens or req.max_tokens, None, "messages"
        else:
            single = req.single_prompt()
            text = single if isinstance(single, str) else ""
            ids = prompter.completion_ids(single)
            requested, default, what = req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, "prompt"
        max_tokens = prompter.max_tokens(requested, len(ids), default, what)
        if chat and upstream.info.contract == "text":
            text = prompter.for_text_model(text)
        prompt = Prompt(ids, text)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        gen = Generation(upstream, tokenizer, rid, prompt, max_tokens, bool(req.stream), stops,
                         sampling_fields(req, max_tokens), decode)
        shape, headers = Shape(chat, rid, cfg.model_name, int(time.time())), {"X-Request-Id": rid}
        deltas = gen.deltas()
        if req.stream:
            first = await _unless_disconnected(request, _first(deltas))
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(sse_events(gen, deltas, first, shape, include_usage), headers)
        text_out = await _unless_disconnected(request, _whole(gen, deltas))
        return JSONResponse(shape.whole(text_out, gen), headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


async def _first(deltas: AsyncIterator[str]) -> str | None:
    """The first text of a stream, awaited before the response starts, so an early failure gets its status."""
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await deltas.aclose()
        raise


async def _whole(gen: Generation, deltas: AsyncIterator[str]) -> str:
    async with aclosing(deltas):
        return "".join([text async for text in deltas]) + gen.tail


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result; if the client disconnects first, `work` is cancelled (closing its Triton stream,
    which cancels the request on the server)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    raise ApiError(499, "the client closed the connection; the request was cancelled")
