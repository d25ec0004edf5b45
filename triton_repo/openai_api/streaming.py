"""Response bodies: whole responses and the SSE chunks of streamed ones (`data: {json}` events, then
`data: [DONE]`), for completions and chat completions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from enginesmith.triton_repo.openai_api.errors import ApiError
from enginesmith.triton_repo.openai_api.generation import Generation
from enginesmith.triton_repo.openai_api.upstream import UpstreamError

DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def usage(gen: Generation) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


class Shape:
    """Where the text goes in one kind of response: `choices[0].text` or `choices[0].message/delta`."""

    def __init__(self, chat: bool, rid: str, model: str, created: int):
        self.chat, self.head = chat, {"id": rid, "object": "", "created": created, "model": model}
        # a text chunk is the same JSON every time but for the text: encode the rest once per request
        self._before, _, self._after = sse(self.chunk("\0")).partition(b'"\\u0000"')

    def text_event(self, text: str) -> bytes:
        """sse(self.chunk(text)), without encoding the whole chunk for every token."""
        return self._before + json.dumps(text, ensure_ascii=False).encode() + self._after

    def whole(self, text: str, gen: Generation) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": gen.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": obj, "choices": [choice], "usage": usage(gen)}

    def chunk(self, delta: dict[str, Any] | str, finish_reason: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            choice["delta"] = delta if isinstance(delta, dict) else {"content": delta}
        else:
            choice["text"] = delta if isinstance(delta, str) else ""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head, "object": obj, "choices": [choice]}

    def usage_chunk(self, gen: Generation) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head, "object": obj, "choices": [], "usage": usage(gen)}


async def sse_events(gen: Generation, shape: Shape, include_usage: bool) -> AsyncIterator[bytes]:
    """A chunk per delta, the last one with the held-back tail and the finish reason, the usage if asked for,
    then [DONE]. The request was checked before the response started (gen.prepare()), so a failure here is
    Triton's: it is sent as an `error` event, then [DONE]."""
    deltas = gen.deltas()
    try:
        if shape.chat:
            yield sse(shape.chunk({"role": "assistant", "content": ""}))
        try:
            async for text in deltas:
                yield shape.text_event(text)
        except (ApiError, UpstreamError) as e:
            err = e if isinstance(e, ApiError) else ApiError(e.status, str(e))
            yield sse(err.body())
            yield DONE
            return
        tail = {"content": gen.tail} if shape.chat and gen.tail else ({} if shape.chat else gen.tail)
        yield sse(shape.chunk(tail, gen.finish_reason))
        if include_usage:
            yield sse(shape.usage_chunk(gen))
        yield DONE
    finally:
        await deltas.aclose()  # a client that went away: the request stops on the server


class EventStream(StreamingResponse):
    """SSE response that closes its event generator however the response ends (a disconnect cancels the
    sending task while the generator waits at a `yield`)."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
