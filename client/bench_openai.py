"""The bench's OpenAI backend: each request is one streamed `/v1/completions` (SSE) to an OpenAI-compatible
server, such as enginesmith's front.

The prompt goes as text (as to the ensemble), greedy unless the run's sampling says otherwise (Triton's
default); `min_tokens` (vLLM's extension, which the front takes) asks for exactly the dataset's output
length. Every SSE event that carries text is one streamed response; the token counts come from the final
`usage` (`stream_options.include_usage`), the excess over one per event going to the last one. Triton's
statistics are read too when the Triton gRPC endpoint is known. The HTTP client is aiohttp (as vLLM's bench
uses; tritonclient[http] brings it): per request it costs ~0.25 ms less than httpx.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from enginesmith.client.bench import BenchConfig, _Runner
from enginesmith.client.dataset import Prompt
from enginesmith.client.params import ClientError
from enginesmith.client.record import RequestRecord
from enginesmith.client.server_stats import stats_snapshot
from enginesmith.client.target import openai_base


class OpenAIRunner(_Runner):
    backend = "openai-completions-stream"

    def __init__(self, cfg: BenchConfig, http: Any, base: str, model_name: str, stats_client: Any = None):
        self.cfg, self.http, self.base, self._model_name = cfg, http, base, model_name
        self.stats_client, self.tokenizer, self.on_done = stats_client, None, None
        self.sent: list[tuple[int, ...]] = []
        """Input ids of every prompt sent so far (warm-up included), in order."""

    @property
    def contract(self) -> str:
        return "openai"

    @property
    def model_name(self) -> str:
        return self._model_name

    async def stats(self) -> dict[str, Any]:
        if self.stats_client is None:
            return {}
        try:
            return stats_snapshot(await self.stats_client.get_inference_statistics(as_json=True))
        except Exception:  # noqa: BLE001 - Triton's statistics are extra evidence, not needed for the run
            return {}

    def body(self, prompt: Prompt) -> dict[str, Any]:
        body = {"model": self._model_name, "prompt": prompt.text, "max_tokens": prompt.output_len, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0, **self.cfg.sampling}
        if self.cfg.ignore_eos:
            body["min_tokens"] = prompt.output_len
        return body

    async def send(self, prompt: Prompt, issue_ns: int, sent_ns: int | None = None) -> RequestRecord:
        rec = RequestRecord(uuid.uuid4().hex[:16], prompt.prompt_len, prompt.output_len, issue_ns=issue_ns)
        self.sent.append(prompt.input_ids)
        body, usage = self.body(prompt), None
        rec.start_ns = sent_ns or time.monotonic_ns()
        try:
            async with self.http.post(f"{self.base}/completions", json=body) as r:
                if r.status != 200:
                    raise ClientError(f"HTTP {r.status}: {(await r.read()).decode(errors='replace')[:300]}")
                async for line in r.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    now = time.monotonic_ns()
                    if data == b"[DONE]":
                        rec.end_ns = now
                        break
                    event = json.loads(data)
                    if "error" in event:
                        rec.error = str(event["error"].get("message", event["error"]))
                        break
                    if event.get("usage"):
                        usage = int(event["usage"]["completion_tokens"])
                    choice = event["choices"][0] if event.get("choices") else None
                    if choice is None:
                        continue
                    rec.text += choice.get("text") or ""
                    if choice.get("finish_reason") is None:  # one streamed response of the model
                        rec.chunk_ns.append(now)
                        rec.chunk_tokens.append(1)
        except ClientError as e:
            rec.error = str(e)
        except Exception as e:  # noqa: BLE001 - a failed request is data, the run goes on
            rec.error = f"{type(e).__name__}: {e}"
        rec.end_ns = rec.end_ns or time.monotonic_ns()
        if usage is not None and rec.chunk_tokens and usage > rec.output_tokens:
            rec.chunk_tokens[-1] += usage - rec.output_tokens
        if rec.error is None and not rec.chunk_ns:
            rec.error = "no output tokens"
        if self.on_done is not None:
            self.on_done()
        return rec


@asynccontextmanager
async def openai_runner(cfg: BenchConfig):
    """An OpenAIRunner over one pooled HTTP client; the model is `cfg.model`, or the only one served."""
    import aiohttp

    if not cfg.openai_url:
        raise ClientError("the openai backend needs the front's URL (http://host:port/v1)")
    base = openai_base(cfg.openai_url)
    stats_client = None
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        try:
            async with http.get(f"{base}/models") as r:
                served = [m["id"] for m in (await r.json())["data"]]
        except (aiohttp.ClientError, ValueError, KeyError, TypeError) as e:
            raise ClientError(f"{base}/models: not an OpenAI API ({type(e).__name__}: {e}); is the front up?") from None
        name = cfg.model or (served[0] if served else "")
        if name not in served:
            raise ClientError(f"model {name!r} is not served at {base} (served: {served})")
        if cfg.grpc_url:
            import tritonclient.grpc.aio as grpcaio

            stats_client = grpcaio.InferenceServerClient(cfg.grpc_url)
        try:
            yield OpenAIRunner(cfg, http, base, name, stats_client)
        finally:
            if stats_client is not None:
                await stats_client.close()
