"""The load generator: asyncio over tritonclient.grpc.aio streaming, one bidirectional stream per request
(or, with `backend="openai"`, streamed `/v1/completions` of the OpenAI front: client/bench_openai.py).

Load is either closed-loop (fixed concurrency: a new request as soon as one finishes) or open-loop (Poisson
arrivals at a request rate, optionally capped by a concurrency limit). A run is bounded by a prompt count
and optionally a duration (no new request after it; in-flight ones finish). Warm-up requests run first and
are excluded. Each point of a sweep also snapshots Triton's statistics and samples /metrics; the prefix
cache's reused / missed block totals before and after the point give its measured hit rate, and the prompts
sent so far give the hit rate an unbounded prefix cache would have had (what enabling reuse would gain).
With `client_procs` > 1 each point is driven by that many worker processes (client/bench_procs.py); warm-up,
statistics, /metrics and everything computed from the records stay in this process.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from enginesmith.client.dataset import Prompt, prefix_cache_hits
from enginesmith.client.grpc_stream import infer_inputs, is_final, result_outputs
from enginesmith.client.model_info import ModelInfo, grpc_aio_model_info
from enginesmith.client.params import TIME_OUTPUTS, GenerateParams, build_inputs
from enginesmith.client.record import RequestRecord
from enginesmith.client.server_stats import MetricsPoller, metrics_sample, reuse_delta, stats_delta, stats_snapshot
from enginesmith.client.stats import finite, per_request_arrays, summarize
from enginesmith.client.tokenizer import with_token_ids


@dataclass(frozen=True)
class LoadPoint:
    mode: str
    """"concurrency" (closed loop) or "rate" (Poisson arrivals, req/s; inf sends all at once)."""
    value: float
    max_concurrency: int | None = None
    """Rate mode only: at most this many in flight (the rest wait in the client, counted as queue_times)."""

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"c{int(self.value)}"
        return "rinf" if math.isinf(self.value) else f"r{self.value:g}"


@dataclass
class BenchConfig:
    grpc_url: str
    """Triton's gRPC endpoint (requests, and the per-model statistics); may be "" for the openai backend."""
    model: str = "tensorrt_llm"
    """The Triton model; for the openai backend the served model name ("" = the one /v1/models lists)."""
    metrics_url: str | None = None
    points: list[LoadPoint] = field(default_factory=lambda: [LoadPoint("concurrency", 1)])
    num_prompts: int = 32
    """Requests per point (prompts are reused round-robin if the dataset is smaller)."""
    duration_s: float | None = None
    warmup: int = 2
    ignore_eos: bool = True
    """Ask for exactly the dataset's output length (min_tokens = max_tokens), as trtllm-bench does."""
    slo_ms: dict[str, float] = field(default_factory=dict)
    """Goodput SLOs: any of ttft / tpot / e2el in ms."""
    sampling: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    request_timeout_s: float = 600.0
    tokenizer_id: str = ""
    metrics_period_s: float = 0.25
    tokens_per_block: int = 32
    """KV block size for the prompts' prefix hit rate when /metrics does not report it (tokens_per)."""
    server_timings: bool = True
    """Ask the model for each request's arrival / scheduled / first / last token times (return_perf_metrics);
    off: a leaner response per token (the four extra outputs cross every model of an ensemble)."""
    backend: str = "triton"
    """"triton" (gRPC streaming to `model`) or "openai" (streamed /v1/completions at `openai_url`)."""
    openai_url: str | None = None
    client_procs: int = 1
    """Client processes that drive each load point (client/bench_procs.py): one saturates a core at a few
    thousand streamed responses a second."""


def requested_outputs(info: ModelInfo) -> list[Any] | None:
    """Only the outputs the bench reads (tokens or text, the running token count, the timings): less to
    serialize on the server and to parse in the client per streamed token."""
    from tritonclient.grpc import InferRequestedOutput

    wanted = ["output_ids"] if info.contract == "tokens" else ["text_output", "num_output_tokens"]
    names = [n for n in (*wanted, *TIME_OUTPUTS) if n in info.outputs]
    return [InferRequestedOutput(n) for n in names] if names else None


class _Runner:
    backend = "triton-grpc-stream"

    def __init__(self, cfg: BenchConfig, client: Any, info: ModelInfo, tokenizer: Any):
        self.cfg, self.client, self.info, self.tokenizer = cfg, client, info, tokenizer
        self.on_done = None
        self.outputs = requested_outputs(info)
        self.sent: list[tuple[int, ...]] = []
        """Input ids of every prompt sent so far (warm-up included), in order."""

    @property
    def contract(self) -> str:
        return self.info.contract

    @property
    def model_name(self) -> str:
        return self.cfg.model

    async def stats(self) -> dict[str, Any]:
        """Triton's cumulative per-model statistics (a point's share is the difference of two)."""
        return stats_snapshot(await self.client.get_inference_statistics(as_json=True))

    def _tensors(self, prompt: Prompt, rid: str) -> list[Any]:
        p = GenerateParams(text=prompt.text, input_ids=list(prompt.input_ids), max_tokens=prompt.output_len,
                           stream=True, request_id=rid, **self.cfg.sampling)
        if self.cfg.ignore_eos:
            p.min_tokens = prompt.output_len
        if self.cfg.server_timings and "return_perf_metrics" in self.info.inputs:
            p.return_perf_metrics = True
        if self.info.contract == "text" and "return_num_output_tokens" in self.info.inputs:
            p.return_num_output_tokens = True
        if self.info.contract == "tokens":
            p = with_token_ids(p, self.tokenizer)
        return infer_inputs(build_inputs(p, self.info.contract, self.info.batched, set(self.info.inputs)))

    def _count(self, outputs: dict[str, np.ndarray], rec: RequestRecord) -> int:
        if self.info.contract == "tokens":
            arr = np.asarray(outputs["output_ids"])
            ids = [int(x) for x in arr.reshape(-1, arr.shape[-1])[0] if x >= 0]  # beam 0
            rec.token_ids.extend(ids)
            return len(ids)
        rec.text += "".join(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                            for x in np.asarray(outputs["text_output"], dtype=object).reshape(-1))
        if "num_output_tokens" in outputs:  # the running total the model reports: exact
            return max(0, int(np.asarray(outputs["num_output_tokens"]).reshape(-1)[0]) - rec.output_tokens)
        return 1  # else: a streaming text model sends one response per generated token

    async def send(self, prompt: Prompt, issue_ns: int, sent_ns: int | None = None) -> RequestRecord:
        """One streamed request. sent_ns: when it left the load generator, if that is known already (a closed
        loop sends at issue); else now."""
        rid = uuid.uuid4().hex[:16]
        self.sent.append(prompt.input_ids)
        rec = RequestRecord(rid, prompt.prompt_len, prompt.output_len, issue_ns=issue_ns)
        inputs = self._tensors(prompt, rid)

        async def one_request():
            yield {"model_name": self.cfg.model, "inputs": inputs, "request_id": rid, "outputs": self.outputs}

        rec.start_ns = sent_ns or time.monotonic_ns()
        try:
            stream = self.client.stream_infer(one_request(), stream_timeout=self.cfg.request_timeout_s)
            async for result, error in stream:
                now = time.monotonic_ns()
                if error is not None:
                    rec.error = str(error)
                    stream.cancel()  # the server stops working on it
                    break
                outputs = result_outputs(result)
                for name in TIME_OUTPUTS:
                    if name in outputs:
                        rec.server_times_ns[name] = int(np.asarray(outputs[name]).reshape(-1)[0])
                if ("output_ids" in outputs or "text_output" in outputs) and (n := self._count(outputs, rec)):
                    rec.chunk_ns.append(now)
                    rec.chunk_tokens.append(n)
                if is_final(result):
                    rec.end_ns = now
        except Exception as e:  # noqa: BLE001 - a failed request is data, the run goes on
            rec.error = f"{type(e).__name__}: {e}"
        rec.end_ns = rec.end_ns or time.monotonic_ns()
        if rec.error is None and not rec.chunk_ns:
            rec.error = "no output tokens"
        if self.on_done is not None:
            self.on_done()
        return rec

    async def drive(self, prompts: list[Prompt], point: LoadPoint, duration_s: float | None,
                    origin: float | None = None) -> list[RequestRecord]:
        """Issue the prompts as the point says; with duration_s, none after origin + duration_s (origin: the
        time.monotonic() the point's times count from, default now). A closed loop sends each request when it
        admits it, so its start times stay inside the duration too."""
        closed = point.mode == "concurrency"
        limit = int(point.value) if closed else point.max_concurrency
        sem = asyncio.Semaphore(limit) if limit else None
        rng = np.random.default_rng(self.cfg.seed)
        start = time.monotonic() if origin is None else origin
        next_at = 0.0
        tasks: list[asyncio.Task] = []

        async def run(prompt: Prompt, issue_ns: int, acquired: bool) -> RequestRecord:
            if sem is not None and not acquired:
                await sem.acquire()
            try:  # acquired: admitted with its slot, so sent at issue
                return await self.send(prompt, issue_ns, issue_ns if acquired else None)
            finally:
                if sem is not None:
                    sem.release()

        for prompt in prompts:
            if not closed and not math.isinf(point.value):
                next_at += float(rng.exponential(1.0 / point.value))
                await asyncio.sleep(max(0.0, start + next_at - time.monotonic()))
            if closed and sem is not None:
                await sem.acquire()
            now_ns = time.monotonic_ns()
            if duration_s is not None and now_ns / 1e9 - start >= duration_s:
                if closed and sem is not None:
                    sem.release()
                break
            tasks.append(asyncio.create_task(run(prompt, now_ns, closed)))
        return list(await asyncio.gather(*tasks))


def _prompts_for(prompts: list[Prompt], n: int, offset: int = 0) -> list[Prompt]:
    """n prompts from `offset` on, wrapping around (fresh prompts per point when there are enough, so a
    prefix cache does not carry over between points)."""
    return [prompts[(offset + i) % len(prompts)] for i in range(n)]


async def _run_point(runner: _Runner, prompts: list[Prompt], point: LoadPoint,
                     procs: Any = None) -> dict[str, Any]:
    """One measured point; `procs` (a started ClientProcs) drives it when its share plan has several workers."""
    from enginesmith.client.bench_procs import plan_shares

    cfg = runner.cfg
    shares, note = plan_shares(point, len(prompts), cfg.client_procs) if cfg.client_procs > 1 else ([], None)
    before = await runner.stats()
    poller = MetricsPoller(cfg.metrics_url, cfg.model, cfg.metrics_period_s) if cfg.metrics_url else None
    if poller is not None:
        await poller.open()
    before_kv = metrics_sample(poller.last_text, cfg.model) if poller is not None else {}
    sent_before = len(runner.sent)

    def start(t0: float) -> None:
        if poller is not None:
            poller.start(t0)

    if len(shares) > 1:
        load = await procs.run_point(shares, prompts, cfg.duration_s, point.label, start, runner.on_done)
        runner.sent.extend(p.input_ids for p in load.sent)
        records, t0_ns, cpus, per_proc = load.records, load.origin_ns, load.cpu_s, load.requests
        duration = (load.end_ns - t0_ns) / 1e9
    else:
        t0_ns, cpu0 = time.monotonic_ns(), time.process_time()
        start(t0_ns / 1e9)
        records = await runner.drive(prompts, point, cfg.duration_s, origin=t0_ns / 1e9)
        duration, cpus = (time.monotonic_ns() - t0_ns) / 1e9, [time.process_time() - cpu0]
        per_proc = [len(records)]
    cpu = sum(cpus)
    after_kv = await poller.settled() if poller is not None else {}
    series = await poller.stop() if poller is not None else []
    after = await runner.stats()
    if runner.tokenizer is not None:
        for r in records:
            r.text = r.text or runner.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    done = max(1, sum(r.success for r in records))
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": runner.backend,
        "model_id": runner.model_name, "tokenizer_id": cfg.tokenizer_id, "num_prompts": len(records),
        "request_rate": finite(point.value if point.mode == "rate" else math.inf), "burstiness": 1.0,
        "max_concurrency": int(point.value) if point.mode == "concurrency" else point.max_concurrency,
        "label": point.label, "load_mode": point.mode, "load_value": finite(point.value),
        "contract": runner.contract, "slo_ms": dict(cfg.slo_ms),
        **summarize(records, duration, cfg.slo_ms or None),
        "client_procs": len(cpus), "client_procs_note": note, "client_requests_per_proc": per_proc,
        # summed over the client processes; _max_proc: the busiest one's share of one core
        "client_cpu_s": cpu, "client_cpu_s_per_request": cpu / done, "client_cpu_utilization": cpu / duration,
        "client_cpu_s_per_proc": cpus, "client_cpu_utilization_max_proc": max(cpus) / duration,
        "triton_stats": stats_delta(before, after), "metrics_series": series,
        **reuse_delta(before_kv, after_kv), **_prefix_hit_rate(runner.sent, sent_before, before_kv, cfg),
        **per_request_arrays(records, t0_ns),
    }


def _prefix_hit_rate(sent: list[tuple[int, ...]], start: int, sample: dict[str, float],
                     cfg: BenchConfig) -> dict[str, Any]:
    """The share of the point's prompt blocks (sent[start:]) that an unbounded prefix cache would have held,
    given every prompt sent before them, at the server's block size."""
    tpb = int(sample.get("kv_tokens_per") or cfg.tokens_per_block)
    seen: set[int] = set()
    prefix_cache_hits(sent[:start], tpb, seen)
    hits, total = prefix_cache_hits(sent[start:], tpb, seen)
    return {"kv_tokens_per_block": tpb, "prompt_prefix_hit_rate": hits / total if total else None}


async def run_bench(cfg: BenchConfig, prompts: list[Prompt], tokenizer: Any = None,
                    show_progress: bool = True) -> list[dict[str, Any]]:
    """Warm up, then run every load point in order; one vLLM-style result dict per point."""
    from enginesmith.client.bench_progress import progress_bar

    from enginesmith.client.bench_procs import client_procs, plan_shares

    if not prompts:
        raise ValueError("no prompts to send")
    if cfg.client_procs < 1:
        raise ValueError(f"client_procs {cfg.client_procs}: at least 1 process must drive the load")
    workers = max(len(plan_shares(p, cfg.num_prompts, cfg.client_procs)[0]) for p in cfg.points)
    async with open_runner(cfg, tokenizer) as runner:
        with client_procs(cfg, tokenizer, workers) as procs:  # they start while this process warms up
            if cfg.warmup:
                await runner.drive(_prompts_for(prompts, cfg.warmup), LoadPoint("concurrency", min(cfg.warmup, 4)),
                                   None)
            if procs is not None:
                await procs.wait_up()
            results = []
            with progress_bar(show_progress) as bar:
                for i, point in enumerate(cfg.points):
                    runner.on_done = bar.task(f"{runner.model_name} {point.label}", cfg.num_prompts)
                    batch = _prompts_for(prompts, cfg.num_prompts, cfg.warmup + i * cfg.num_prompts)
                    results.append(await _run_point(runner, batch, point, procs))
        return results


def open_runner(cfg: BenchConfig, tokenizer: Any = None):
    """The run's client as an async context manager: gRPC streaming to Triton, or the OpenAI front."""
    if cfg.backend == "openai":
        from enginesmith.client.bench_openai import openai_runner

        return openai_runner(cfg)
    return _triton_runner(cfg, tokenizer)


@asynccontextmanager
async def _triton_runner(cfg: BenchConfig, tokenizer: Any):
    import tritonclient.grpc.aio as grpcaio

    client = grpcaio.InferenceServerClient(cfg.grpc_url)
    try:
        yield _Runner(cfg, client, await grpc_aio_model_info(client, cfg.model), tokenizer)
    finally:
        await client.close()

