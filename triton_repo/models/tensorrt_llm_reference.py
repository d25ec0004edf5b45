"""Triton Python-backend `tensorrt_llm` model of the `reference` target (copied to tensorrt_llm/1/model.py).

It keeps upstream's tensor contract (runtime/engine/tensor_contract.py) and `parameters` keys, and runs the
reference engine (runtime/engine/engine.py) in a process of its own (runtime/engine/engine_process.py) whose loop
shares no GIL with this stub's response thread, or in a background thread: the parameter `engine_process`
(true / false; empty: the process where there is a GPU) or ENGINESMITH_ENGINE_PROCESS=1/0 (which wins). Decoupled:
every request gets a response sender; when streaming, each new token is sent as soon as it is sampled (with the
`stream_interval` parameter, the tokens of that many steps together after the first); the last response carries
TRITONSERVER_RESPONSE_COMPLETE_FINAL (and no token when the row ended without one, as upstream's does).
Cancellation: Triton's request cancellation (polled every cancellation_check_period_ms), a second
request with the same request id and `stop=true`, and, for a streamed ensemble request whose client left
(which Triton does not cancel here), the stream ledger showing that postprocessing stopped taking its
chunks (triton_repo/detokenize.py). A bad request gets an error response; the model keeps serving.
The stub must import enginesmith: triton_repo/discovery.py gives it an environment with the virtualenv's
site-packages and the folder `enginesmith` imports from (the checkout root, or where it is installed).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

import triton_python_backend_utils as pb_utils

from enginesmith.runtime.engine.engine_config import EngineConfigError, serving_device
from enginesmith.runtime.engine.engine_process import EngineProcess, EngineProcessError, engine_process_wanted
from enginesmith.runtime.engine.request import Request, RequestError, TokenUpdate
from enginesmith.runtime.engine.tensor_contract import RowSpec, parse_rows, response_arrays
from enginesmith.triton_repo.detokenize import LedgerWriter, server_ledger_path, stream_key
from enginesmith.triton_repo.models.model_args import check_stub_numpy
from enginesmith.triton_repo.server_log import STOP_VERDICT

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
IN_FLIGHT_TYPES = ("inflight_fused_batching", "inflight_batching")
ITERATION_LOG_ENV = "ENGINESMITH_ITERATION_LOG"


def read_parameter(config: dict, name: str, kind=str):
    """An upstream `parameters` string_value as `kind`; None when absent or empty; ValueError when malformed."""
    raw = config.get("parameters", {}).get(name, {}).get("string_value")
    if raw is None or raw.strip() == "":
        return None
    if raw.startswith("${") and raw.endswith("}"):
        raise ValueError(f"parameter {name} is an unfilled template placeholder {raw!r}: give a value or drop it")
    if kind is bool:
        low = raw.strip().lower()
        if low not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"parameter {name}={raw!r} is not a boolean (true/false)")
        return low in ("1", "true", "yes")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"parameter {name}={raw!r} is not a valid {kind.__name__}") from None


class _Responder:
    """Sends the responses of one Triton request (one or more batch rows) through its sender.

    A streamed row sends each new token as it comes, and ends with a response of its last tokens, or of none
    (sequence_length 0, as upstream's backend does) when it ended without one (end_id, cancellation).
    Streamed chunks are recorded in the ledger first (`chunk`; the ResponseQueue records a batch's together),
    under the row's own stream id, for the ensemble's postprocessing (triton_repo/detokenize.py)."""

    def __init__(self, sender, num_rows: int, output_names: set[str], ledger: LedgerWriter | None = None,
                 key: str = ""):
        self.sender, self.remaining, self.output_names = sender, num_rows, output_names
        self.ledger, self.key = ledger, key

    def on_update(self, spec: RowSpec, update: TokenUpdate) -> None:
        """Called from the ResponseQueue's one sender thread only."""
        self.remaining -= update.finished
        flags = FINAL if update.finished and self.remaining == 0 else 0
        req = update.request
        if update.error is not None:
            self._ended(spec, req)
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"request {req.request_id or '<no id>'} row {spec.batch_index} failed: {update.error}")), flags=flags)
        elif spec.streaming and (update.new_tokens or update.finished):
            self._send(spec, req, update.new_tokens, req.log_probs[len(req.log_probs) - len(update.new_tokens):],
                       flags)
        elif not spec.streaming and update.finished:
            tokens = req.output if spec.exclude_input_in_output else req.tokens
            self._send(spec, req, tokens, req.log_probs, flags)
        elif flags:
            self.sender.send(flags=flags)

    def stream_gone(self, spec: RowSpec, req: Request) -> bool:
        """The ensemble request this streamed row answers is gone (postprocessing stopped taking its chunks)."""
        if self.ledger is None or not spec.streaming:
            return False
        try:
            return self.ledger.gone(stream_id(req))
        except sqlite3.Error as e:
            pb_utils.Logger.log_warn(f"tensorrt_llm (reference): stream ledger unavailable: {e}")
            return False

    def chunk(self, spec: RowSpec, update: TokenUpdate) -> tuple[str, str, list[int], bool] | None:
        """The ledger's record of the chunk `on_update` will stream for this update (None: it streams none)."""
        if self.ledger is None or not spec.streaming or update.error is not None:
            return None
        if not (update.new_tokens or update.finished):
            return None
        return stream_id(update.request), self.key, update.new_tokens, update.finished

    def _ended(self, spec: RowSpec, req: Request) -> None:
        if self.ledger is None or not spec.streaming:
            return
        try:
            self.ledger.ended(stream_id(req))
        except sqlite3.Error as e:
            pb_utils.Logger.log_warn(f"tensorrt_llm (reference): stream ledger unavailable: {e}")

    def _send(self, spec: RowSpec, req: Request, tokens: list[int], log_probs: list[float], flags: int) -> None:
        arrays = response_arrays(spec, req, tokens, log_probs, self.output_names)
        tensors = [pb_utils.Tensor(name, arr) for name, arr in arrays.items()]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)


def stream_id(req: Request) -> str:
    return f"{os.getpid()}-{req.seq_id}"


Pending = tuple[_Responder, RowSpec, TokenUpdate]


def record_chunks(pending: list[Pending]) -> None:
    """Record the streamed chunks of `pending` in the stream ledger, in one transaction, before any is sent."""
    by_ledger: dict[int, tuple[LedgerWriter, list]] = {}
    for responder, spec, update in pending:
        if (chunk := responder.chunk(spec, update)) is not None:
            by_ledger.setdefault(id(responder.ledger), (responder.ledger, []))[1].append(chunk)
    for ledger, chunks in by_ledger.values():
        try:
            ledger.sent_many(chunks)
        except sqlite3.Error as e:  # the ensemble's text falls back to decoding these chunks alone
            pb_utils.Logger.log_warn(f"tensorrt_llm (reference): stream ledger unavailable: {e}")


def merge_updates(batch: list[Pending]) -> list[Pending]:
    """One update per row, in the order rows first appear: the tokens that queued up for a row since its last
    response go out together (as TensorRT-LLM's streaming does when the client falls behind)."""
    rows: dict[int, tuple[_Responder, RowSpec, list[TokenUpdate]]] = {}
    for responder, spec, u in batch:
        rows.setdefault(id(u.request), (responder, spec, []))[2].append(u)
    return [(responder, spec, combine(ups)) for responder, spec, ups in rows.values()]


def combine(ups: list[TokenUpdate]) -> TokenUpdate:
    """Consecutive updates of one row as one."""
    if len(ups) == 1:
        return ups[0]
    error = next((u.error for u in reversed(ups) if u.error is not None), None)
    return TokenUpdate(ups[0].request, [t for u in ups for t in u.new_tokens],
                       [lp for u in ups for lp in u.new_log_probs], any(u.finished for u in ups), error)


class StreamInterval:
    """`stream_interval` (a parameter of this model): a streamed row's tokens after its first are held until
    `steps` of them are there; the end, an error, or a row's first token go out at once. Only the response thread
    uses it."""

    def __init__(self, steps: int):
        self.steps = steps
        self._held: dict[int, list[TokenUpdate]] = {}
        self._started: set[int] = set()

    def release(self, pending: list[Pending]) -> list[Pending]:
        """What to send now of `pending` (one update per row): the rest is held for a later call."""
        if self.steps == 1:
            return pending
        out = []
        for responder, spec, u in pending:
            key = id(u.request)
            ups = [*self._held.pop(key, []), u]
            if not spec.streaming or u.finished or u.error is not None:
                self._started.discard(key)
                out.append((responder, spec, combine(ups)))
            elif key not in self._started or sum(len(x.new_tokens) for x in ups) >= self.steps:
                self._started.add(key)
                out.append((responder, spec, combine(ups)))
            else:
                self._held[key] = ups
        return out


class ResponseQueue:
    """Responses leave the engine's loop: the engine thread only queues each token update; one sender thread
    builds and sends the responses, merging what queued up for a row into one response, and polls the live
    requests' cancellation (is_cancelled is a round trip to the server) every `poll_s`. At low load every token
    still goes out alone; under load the engine's step no longer waits for hundreds of sends."""

    def __init__(self, poll_s: float, stream_interval: int = 1):
        self.poll_s = poll_s
        self.interval = StreamInterval(stream_interval)
        self._items: list[Pending] = []
        self._live: dict[int, tuple[Request, object]] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tensorrt_llm-responses", daemon=True)
        self._thread.start()

    def watch(self, req: Request, is_cancelled) -> None:
        with self._cv:
            self._live[id(req)] = (req, is_cancelled)

    def put(self, responder: _Responder, spec: RowSpec, update: TokenUpdate) -> None:
        with self._cv:
            self._items.append((responder, spec, update))
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                if self._serve_once():
                    return
            except Exception as e:  # a bug here must not silence every request: log it and go on
                pb_utils.Logger.log_error(f"tensorrt_llm (reference): response thread: {type(e).__name__}: {e}")

    def _serve_once(self) -> bool:
        """Send what is queued and poll cancellations until told to stop (returns True then)."""
        next_poll = time.monotonic() + self.poll_s
        while True:
            with self._cv:
                while not self._items and not self._stopping and time.monotonic() < next_poll:
                    self._cv.wait(timeout=max(0.0, next_poll - time.monotonic()))
                batch, self._items = self._items, []
                if self._stopping and not batch:
                    return True
            pending = self.interval.release(merge_updates(batch))
            record_chunks(pending)
            for responder, spec, update in pending:
                if update.finished:
                    with self._cv:
                        self._live.pop(id(update.request), None)
                try:
                    responder.on_update(spec, update)
                except Exception as e:  # the client is gone: stop working for it
                    pb_utils.Logger.log_warn(f"tensorrt_llm (reference): response to request "
                                             f"{update.request.request_id or '<no id>'} failed: {e}; cancelling it")
                    update.request.cancel_requested = True
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_s
                with self._cv:
                    live = list(self._live.values())
                for req, is_cancelled in live:
                    if not req.finished and not req.cancel_requested and _cancelled(is_cancelled):
                        req.cancel_requested = True  # the engine drops it at its next step


def _cancelled(is_cancelled) -> bool:
    try:
        return bool(is_cancelled())
    except Exception:  # a sender that cannot answer belongs to a client that is gone
        return True


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        try:
            check_stub_numpy()
            self._configure(config)
            self.engine = self._load_engine(config)
        except (ValueError, EngineConfigError, EngineProcessError) as e:
            raise pb_utils.TritonModelException(f"tensorrt_llm (reference): {e}") from None
        self.engine.metrics = self._metrics(args, config)
        self.ledger = self._ledger()
        self.responses = ResponseQueue(self.engine.config.cancellation_check_period_ms / 1000, self.stream_interval)
        self.engine.start()

    @staticmethod
    def _ledger() -> LedgerWriter | None:
        """The stream ledger the ensemble's postprocessing reads (None, with a warning, if it cannot be made:
        the ensemble then decodes each streamed chunk alone and cannot stop a request whose client left)."""
        path = server_ledger_path()
        try:
            return LedgerWriter(path)
        except (sqlite3.Error, OSError) as e:
            pb_utils.Logger.log_warn(f"tensorrt_llm (reference): no stream ledger at {path}: {e}")
            return None

    def _configure(self, config: dict) -> None:
        p = lambda name, kind=str: read_parameter(config, name, kind)  # noqa: E731
        if int(config.get("max_batch_size", 0)) < 1:
            raise ValueError("max_batch_size must be >= 1 (inputs carry a batch dimension, as upstream)")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.engine_dir = p("gpt_model_path")
        if not self.engine_dir:
            raise ValueError("parameter gpt_model_path (the reference engine directory) is required")
        if (model_type := p("gpt_model_type")) not in (None, *IN_FLIGHT_TYPES):
            raise ValueError(f"gpt_model_type={model_type!r}: the reference runtime does in-flight batching only "
                             f"({' or '.join(IN_FLIGHT_TYPES)})")
        if p("max_beam_width", int) not in (None, 1):
            raise ValueError(f"max_beam_width={p('max_beam_width')}: the reference runtime has no beam search")
        self.exclude_input = bool(p("exclude_input_in_output", bool))
        interval = p("stream_interval", int)
        self.stream_interval = 1 if interval is None else interval
        if self.stream_interval < 1:
            raise ValueError(f"parameter stream_interval={self.stream_interval} must be >= 1 (1: every token)")
        self.stats_period_s = (p("stats_check_period_ms", int) or 100) / 1000
        self.output_names = {o["name"] for o in config.get("output", [])}
        self.overrides = dict(
            batch_scheduler_policy=p("batch_scheduler_policy"),
            kv_cache_free_gpu_mem_fraction=p("kv_cache_free_gpu_mem_fraction", float),
            max_tokens_in_paged_kv_cache=p("max_tokens_in_paged_kv_cache", int),
            enable_chunked_context=p("enable_chunked_context", bool),
            enable_kv_cache_reuse=p("enable_kv_cache_reuse", bool),
            cancellation_check_period_ms=p("cancellation_check_period_ms", int),
            iteration_log_path=p("iteration_log_path") or os.environ.get(ITERATION_LOG_ENV) or None)

    def _load_engine(self, config: dict):
        """The engine in a thread of this process, or in a process of its own (which then picks the device)."""
        gpu_ids = read_parameter(config, "gpu_device_ids")
        if engine_process_wanted(read_parameter(config, "engine_process", bool)):
            engine = EngineProcess.from_engine_dir(self.engine_dir, gpu_device_ids=gpu_ids,
                                                   on_rank_failure=self._on_rank_failure, **self.overrides)
            pb_utils.Logger.log_info(f"tensorrt_llm (reference): the engine runs in process {engine.pid}")
            return engine
        from enginesmith.runtime.engine.engine import Engine

        return Engine.from_engine_dir(self.engine_dir, device=serving_device(gpu_ids),
                                      on_rank_failure=self._on_rank_failure, **self.overrides)

    def _metrics(self, args: dict, config: dict):
        try:
            from enginesmith.runtime.engine.metrics import TritonMetrics
        except ImportError:
            return None
        c = self.engine.config
        return TritonMetrics(pb_utils, args["model_name"], args.get("model_version", "1"),
                             max_batch_size=c.max_batch_size, tokens_per_block=c.tokens_per_block,
                             period_s=self.stats_period_s, publisher=True)

    def execute(self, requests):
        for request in requests:
            arrival_ns = time.monotonic_ns()
            sender = request.get_response_sender()
            try:
                self._handle(request, sender, arrival_ns)
            except RequestError as e:
                rid = request.request_id() or "<no id>"
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"request {rid}: {e}")), flags=FINAL)
            except Exception as e:  # never leave a request without its final response
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"internal error in the reference runtime: {type(e).__name__}: {e}")), flags=FINAL)
        return None

    def _handle(self, request, sender, arrival_ns: int) -> None:
        tensors = {t.name(): t.as_numpy() for t in request.inputs()}
        rid = request.request_id() or ""
        stop = tensors.get("stop")
        if stop is not None and stop.size and bool(stop.reshape(-1)[0]):
            if not rid:
                raise RequestError("stop=true needs the request id of the request to stop")
            self.engine.cancel(rid)
            sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)
            return
        specs = parse_rows(tensors, decoupled=self.decoupled, exclude_input_default=self.exclude_input)
        responder = _Responder(sender, len(specs), self._requested(request), self.ledger,
                               stream_key(rid, request.correlation_id()))
        reqs = []
        for s in specs:
            r = Request(s.prompt, s.max_new_tokens, s.sampling, request_id=rid, arrival_ns=arrival_ns,
                        on_update=lambda u, s=s: self.responses.put(responder, s, u))
            reqs.append((s, r))
        for _, r in reqs:  # all rows valid before any is queued
            self.engine.validate(r)
        for s, r in reqs:
            self.responses.watch(r, lambda s=s, r=r: sender.is_cancelled() or responder.stream_gone(s, r))
            self.engine.submit(r)

    def _requested(self, request) -> set[str]:
        """The outputs this request's client asked for (Triton lists every output when it named none): only
        those are built and sent, as Triton would drop the others; a stub without the call builds them all."""
        try:
            names = request.requested_output_names()
        except AttributeError:
            return self.output_names
        return self.output_names.intersection(names) if names else self.output_names

    def _on_rank_failure(self, rank: int, reason: str) -> None:
        """A rank died or hung: fail what is in flight, then stop the whole server (unready at once, exits
        within --exit-timeout-secs) rather than hang on a collective; the launcher restarts or reports it."""
        import signal

        pb_utils.Logger.log_error(f"tensorrt_llm (reference): {reason}{STOP_VERDICT}")
        threading.Thread(target=self.engine.shutdown, daemon=True).start()
        os.kill(os.getppid(), signal.SIGTERM)

    def finalize(self):
        self.engine.shutdown()
        self.responses.close()
        if self.engine.metrics is not None:
            self.engine.metrics.close()
        if self.ledger is not None:
            self.ledger.close()
