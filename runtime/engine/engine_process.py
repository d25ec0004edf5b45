"""The reference engine in a process of its own, so that no other thread of the serving process shares its GIL.

`EngineProcess` lives in the serving process (the Triton stub) and has the surface the `tensorrt_llm` model uses
of `Engine`: `from_engine_dir`, `config`, `metrics`, `start`, `validate`, `submit`, `cancel`, `shutdown`.
It spawns `engine_main`: a process (not daemonic: as rank 0 it spawns the rank workers of a multi-rank
checkpoint itself) that builds `Engine.from_engine_dir`, owns the device and runs the engine's loop
(`EngineCore`). One duplex pipe joins them, carrying pickled tuples:

- to the engine: each request as plain data (key, prompt, max_new_tokens, SamplingParams, request id,
  arrival_ns), cancellations (by key once a request's `cancel_requested` is set or its `is_cancelled` answers
  true, by request id for `stop`), shutdown;
- back: one message per engine iteration holding a row for every request it changed (new tokens and log probs,
  finished, error, finish reason, timing and KV block counts), as columns (`StepRows`: a few lists whatever the
  number of rows, so a 256-row step pickles fast and leaves the garbage collector nothing per row), and the
  metrics hook calls it made; a rank failure; the end.

A receiver thread applies each message to the serving side's `Request`s (their tokens, log probs, status and
timings, as the response path reads them) and calls their `on_update`, then replays the metrics calls on
`metrics` (TritonMetrics needs the stub's pb_utils). The engine process exits when its parent does (the
parent-pid watch of the rank workers) or closes the pipe. Its own death fails every request in flight and is
reported as a rank failure: `on_rank_failure(0, "the engine process (pid N) exited with code C")`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from enginesmith.runtime.engine.engine_config import EngineConfig, EngineConfigError, read_engine_dir, serving_device
from enginesmith.runtime.engine.request import FinishReason, Request, RequestError, Status, TokenUpdate
from enginesmith.runtime.engine.request_limits import RequestLimits

log = logging.getLogger(__name__)
ENGINE_PROCESS_ENV = "ENGINESMITH_ENGINE_PROCESS"
SHUT_DOWN = "the engine shut down before the request finished"

Columns = tuple[list[int], list[int], list[float], dict[int, tuple["str | None", "str | None"]]]
"""A StepRows as it is sent: (ints, tokens, log_probs, ends)."""
ROW_INTS = 7
"""Per row: key, new tokens, first_scheduled_ns, first_token_ns, last_token_ns, kv_new_blocks, kv_reused_blocks."""
Call = tuple[str, tuple, "dict | None"]
"""(metrics hook name, args, kwargs) of one call the engine made (on_first_token and on_token go as plain
lists of their arguments)."""


class StepRows:
    """What one iteration changed of its requests, one row per update, in flat lists."""

    __slots__ = ("ints", "tokens", "log_probs", "ends")

    def __init__(self):
        self.ints: list[int] = []
        """ROW_INTS values per row: the request's key, how many new tokens it has, its timings and KV block counts
        after the iteration."""
        self.tokens: list[int] = []
        """Every row's new tokens, one row after the other (log_probs alike)."""
        self.log_probs: list[float] = []
        self.ends: dict[int, tuple[str | None, str | None]] = {}
        """Row index -> (error, finish reason) of the rows that finished."""

    def __len__(self) -> int:
        return len(self.ints) // ROW_INTS

    def add(self, key: int, u: TokenUpdate, reason: str | None = None) -> None:
        if u.finished:
            self.ends[len(self)] = (u.error, reason)
        r = u.request
        self.ints += (key, len(u.new_tokens), r.first_scheduled_ns, r.first_token_ns, r.last_token_ns, r.kv_new_blocks,
                      r.kv_reused_blocks)
        self.tokens += u.new_tokens
        self.log_probs += u.new_log_probs

    def columns(self) -> Columns:
        return self.ints, self.tokens, self.log_probs, self.ends


class EngineProcessError(RuntimeError):
    """The engine process could not load the engine, or is gone."""


def cuda_visible() -> bool:
    """Whether this process could use a CUDA device, asked through NVML so that it initialises no CUDA (the stub
    that asks leaves the GPU to the engine process)."""
    import torch

    saved = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        return torch.cuda.is_available()
    finally:
        if saved is None:
            del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = saved


def engine_process_wanted(parameter: bool | None, env: Mapping[str, str] = os.environ,
                          on_gpu: Callable[[], bool] = cuda_visible) -> bool:
    """Serve the engine from its own process: ENGINESMITH_ENGINE_PROCESS when set (1/0, true/false, on/off),
    else the model parameter `engine_process`; unset (auto), where the engine gets a GPU: there its loop is bound
    by Python and kernel launches, and the stub's response threads would share its GIL. On a CPU the thread
    starts faster and loses nothing. Raises ValueError for another value."""
    raw = env.get(ENGINE_PROCESS_ENV, "").strip().lower()
    if not raw:
        return on_gpu() if parameter is None else bool(parameter)
    if raw not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"{ENGINE_PROCESS_ENV}={env[ENGINE_PROCESS_ENV]!r} is not a boolean: set 1 or 0")
    return raw in ("1", "true", "yes", "on")


class EngineProcess:
    """The serving side of an engine running in its own process (see the module docstring)."""

    def __init__(self, proc: Any, conn: Any, config: EngineConfig, vocab_size: int, num_blocks: int,
                 on_rank_failure: Callable[[int, str], None] | None = None):
        self.config, self.vocab_size, self.num_blocks = config, vocab_size, num_blocks
        self.limits = RequestLimits(config, vocab_size, num_blocks)
        self.metrics: Any = None
        """Replays the engine's metrics hook calls (set it before start())."""
        self.pid: int = proc.pid
        self.on_rank_failure = on_rank_failure
        self._proc, self._conn = proc, conn
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._live: dict[int, Request] = {}
        self._cancel_sent: set[int] = set()
        self._stopping = False
        self._receiver: threading.Thread | None = None
        self._shutdown_lock = threading.Lock()

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, *, device: str | None = None, gpu_device_ids: str | None = None,
                        on_rank_failure: Callable[[int, str], None] | None = None, liveness: Any = None,
                        **overrides: Any) -> EngineProcess:
        """Spawn the engine process and wait until its engine is loaded. `device`: as Engine.from_engine_dir;
        None picks it there (serving_device(gpu_device_ids)), so this process never initialises CUDA. Raises
        EngineConfigError (the engine directory or an option is wrong) or EngineProcessError (it died)."""
        from enginesmith.runtime.parallel.spawn import python_executable

        read_engine_dir(engine_dir, **overrides)  # a wrong directory or option fails here, before any spawn
        ctx = multiprocessing.get_context("spawn")
        ctx.set_executable(python_executable())
        conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=engine_main, name="enginesmith-engine", daemon=False,
                           args=(child_conn, str(engine_dir), device, gpu_device_ids, overrides, liveness,
                                 os.getpid()))
        proc.start()
        child_conn.close()  # the engine process holds the only other end: its death reads as EOF here
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            proc.join(10)
            conn.close()
            raise EngineProcessError(f"the engine process exited with code {proc.exitcode} while loading "
                                     f"{engine_dir} (its log lines say why)") from None
        if msg[0] == "error":
            proc.join(10)
            conn.close()
            raise (EngineConfigError if msg[1] == "config" else EngineProcessError)(msg[2])
        _, config, vocab_size, num_blocks = msg
        engine = cls(proc, conn, config, vocab_size, num_blocks, on_rank_failure)
        # before multiprocessing's own exit hook, which would wait for this non-daemonic process forever
        atexit.register(engine.shutdown)
        return engine

    # ---- the Engine surface ----
    def start(self) -> EngineProcess:
        """Start the engine's loop (it reports metrics only when `metrics` is set) and the receiver thread."""
        self._send(("start", self.metrics is not None))
        self._receiver = threading.Thread(target=self._receive, name="engine-process-receiver", daemon=True)
        self._receiver.start()
        return self

    def validate(self, r: Request) -> None:
        """Raises RequestError naming the field and the fix (the engine's own limits)."""
        self.limits.validate(r)

    def submit(self, r: Request) -> None:
        """Queue a request in the engine process (raises RequestError naming the bad field)."""
        self.validate(r)
        with self._lock:
            if self._stopping:
                raise RequestError("the engine is shutting down")
            self._live[r.seq_id] = r
        try:
            self._send(("submit", r.seq_id, r.prompt, r.max_new_tokens, r.sampling, r.request_id, r.arrival_ns))
        except (OSError, ValueError):
            with self._lock:
                self._live.pop(r.seq_id, None)
            raise RequestError("the engine process has stopped") from None

    def cancel(self, request_id: str) -> None:
        """Cancel every in-flight request with this client id (Triton `stop=true`)."""
        try:
            self._send(("stop", request_id))
        except (OSError, ValueError):
            pass  # gone: nothing is in flight any more

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine (requests still in flight fail with 'engine shut down') and wait for its process."""
        with self._shutdown_lock:
            with self._lock:
                self._stopping = True
            try:
                self._send(("shutdown",))
            except (OSError, ValueError):
                pass  # already gone
            if self._receiver is not None and self._receiver is not threading.current_thread():
                self._receiver.join(timeout)
            self._proc.join(timeout)
            if self._proc.is_alive():
                log.error("the engine process (pid %d) did not stop within %g s; terminating it", self.pid, timeout)
                self._proc.terminate()
                self._proc.join(timeout)
            self._fail_live(SHUT_DOWN)
            self._conn.close()

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    # ---- the receiver ----
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _receive(self) -> None:
        period_s = self.config.cancellation_check_period_ms / 1000
        next_scan = time.monotonic() + period_s
        while True:
            try:
                if self._conn.poll(max(0.0, next_scan - time.monotonic())):
                    msg = self._conn.recv()
                    if msg[0] == "closed":
                        return
                    self._handle(msg)
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + period_s
                    self._forward_cancellations()
            except (EOFError, OSError):
                return self._engine_gone()
            except Exception:  # a bug here must not silence every request: log it and go on
                log.exception("engine process receiver: handling a message failed")

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "step":
            self._apply(msg[1])
            if self.metrics is not None:
                self._replay(msg[2])
        elif msg[0] == "rank_failure":
            if self.on_rank_failure is not None:
                self.on_rank_failure(msg[1], msg[2])
        else:
            log.error("engine process receiver: unknown message %r", msg[0])

    def _apply(self, columns: Columns) -> None:
        ints, tokens, log_probs, ends = columns
        keys = ints[::ROW_INTS]
        with self._lock:
            live = self._live
            reqs = [live.pop(key, None) if i in ends else live.get(key) for i, key in enumerate(keys)]
            self._cancel_sent.difference_update(keys[i] for i in ends)
        at = 0
        for i, r in enumerate(reqs):
            j = ROW_INTS * i
            n = ints[j + 1]
            new_tokens, new_log_probs = tokens[at: at + n], log_probs[at: at + n]
            at += n
            if r is None:
                continue
            r.tokens.extend(new_tokens)
            r.log_probs.extend(new_log_probs)
            r.first_scheduled_ns, r.first_token_ns, r.last_token_ns, r.kv_new_blocks, r.kv_reused_blocks = \
                ints[j + 2: j + ROW_INTS]
            end = ends.get(i)
            if end is None:
                r.status, error = Status.RUNNING, None
            else:
                error, reason = end
                r.status, r.error = Status.FINISHED, error
                r.finish_reason = FinishReason(reason) if reason else None
            TokenUpdate(r, new_tokens, new_log_probs, end is not None, error).deliver()

    def _replay(self, metrics: tuple[list[float], list[float], list[Call]]) -> None:
        """The iteration's metrics calls: its first tokens and tokens (order among them does not matter to a
        hook that accumulates), then the others in order."""
        first_tokens, tokens, calls = metrics
        m = self.metrics
        for name, values in (("on_first_token", first_tokens), ("on_token", tokens)):
            if (hook := getattr(m, name, None)) is not None:
                for v in values:
                    _safe(hook, v)
        for name, args, kwargs in calls:
            fn = getattr(m, name, None)
            if fn is None and name == "on_idle":
                fn = getattr(m, "flush", None)
            if fn is not None:
                _safe(fn, *args, **(kwargs or {}))

    def _forward_cancellations(self) -> None:
        """Requests whose cancel_requested was set (or whose is_cancelled answers true) since the last scan."""
        with self._lock:
            live = [(k, r) for k, r in self._live.items() if k not in self._cancel_sent]
        for key, r in live:
            if r.cancel_requested or (r.is_cancelled is not None and _answers_true(r.is_cancelled)):
                with self._lock:
                    self._cancel_sent.add(key)
                self._send(("cancel", key))

    def _engine_gone(self) -> None:
        """EOF: after shutdown its end; otherwise the engine process died."""
        with self._lock:
            expected, self._stopping = self._stopping, True
        if expected:
            return self._fail_live(SHUT_DOWN)
        self._proc.join(5)
        reason = f"the engine process (pid {self.pid}) exited with code {self._proc.exitcode}"
        self._fail_live(reason)
        if self.on_rank_failure is not None:
            self.on_rank_failure(0, reason)
        else:
            log.error(reason)

    def _fail_live(self, error: str) -> None:
        with self._lock:
            live, self._live = list(self._live.values()), {}
        for r in live:
            r.status, r.finish_reason, r.error = Status.FINISHED, FinishReason.FAILED, error
            TokenUpdate(r, [], [], True, error).deliver()


def _safe(fn: Callable, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:
        log.exception("metrics hook %s failed", getattr(fn, "__name__", fn))


def _answers_true(fn: Callable[[], bool]) -> bool:
    try:
        return bool(fn())
    except Exception:
        return True  # a sender that cannot answer belongs to a client that is gone


# ---- the engine process ----
class EngineCore:
    """The engine process's side: runs the engine's loop and sends what each iteration did as one message.

    The outbox is filled by the engine's own thread (its callbacks and metrics calls, then on_step_end), as the
    engine's requests are touched by that thread only; every send holds one lock."""

    def __init__(self, conn: Any):
        self.conn = conn
        self._send_lock = threading.Lock()
        self.rows = StepRows()
        self.first_tokens: list[float] = []
        """Arguments of the iteration's on_first_token calls (one per request; the ones of on_token below)."""
        self.tokens: list[float] = []
        self.calls: list[Call] = []
        """The iteration's other metrics calls, in order."""
        self._requests: dict[int, Request] = {}

    def serve(self, engine: Any) -> None:
        """Announce the engine, then take messages until told to shut down or the serving process is gone."""
        engine.on_step_end = self.flush
        self._send(("ready", engine.config, engine.vocab_size, engine.cache.num_blocks))
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break  # the serving process is gone
            kind = msg[0]
            if kind == "submit":
                self._submit(engine, *msg[1:])
            elif kind == "cancel":
                if (r := self._requests.get(msg[1])) is not None:
                    r.cancel_requested = True  # dropped at the engine's next step
            elif kind == "stop":
                engine.cancel(msg[1])
            elif kind == "start":
                if msg[1]:
                    engine.metrics = MetricsCalls(self)
                engine.start()
            elif kind == "shutdown":
                break
        engine.shutdown()  # the loop has stopped: what it fails now is sent below
        self.flush()
        try:
            self._send(("closed",))
        except OSError:
            pass

    def rank_failed(self, rank: int, reason: str) -> None:
        """RankWorkers' on_failure: the serving process stops the server, as for a rank of its own."""
        try:
            self._send(("rank_failure", rank, reason))
        except OSError:
            pass

    def flush(self) -> None:
        """Send what the iteration's callbacks gathered (the engine's on_step_end)."""
        if not (self.rows or self.calls or self.first_tokens or self.tokens):
            return
        msg = ("step", self.rows.columns(), (self.first_tokens, self.tokens, self.calls))
        self.rows, self.first_tokens, self.tokens, self.calls = StepRows(), [], [], []
        try:
            self._send(msg)
        except OSError:
            pass  # the serving process is gone: the main thread sees EOF and shuts down

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def _submit(self, engine: Any, key: int, prompt: list[int], max_new_tokens: int, sampling: Any,
                request_id: str, arrival_ns: int) -> None:
        r = Request(prompt, max_new_tokens, sampling, request_id=request_id, arrival_ns=arrival_ns,
                    on_update=functools.partial(self._updated, key))
        self._requests[key] = r
        try:
            engine.submit(r)
        except RequestError as e:  # the serving side checked the same limits: only a shutdown gets here
            self._requests.pop(key, None)
            rows = StepRows()
            rows.add(key, TokenUpdate(r, [], [], True, str(e)), FinishReason.FAILED.value)
            self._send(("step", rows.columns(), ([], [], [])))

    def _updated(self, key: int, u: TokenUpdate) -> None:
        if u.finished:
            reason = u.request.finish_reason
            self.rows.add(key, u, reason.value if reason is not None else None)
            self._requests.pop(key, None)
        else:
            self.rows.add(key, u)


class MetricsCalls:
    """The engine process's metrics hook: records each call for the serving side's metrics to replay."""

    def __init__(self, core: EngineCore):
        self._core = core

    def on_iteration(self, *args: Any, **kwargs: Any) -> None:
        self._core.calls.append(("on_iteration", args, kwargs))

    def on_first_token(self, ttft_s: float) -> None:
        self._core.first_tokens.append(ttft_s)

    def on_token(self, itl_s: float) -> None:
        self._core.tokens.append(itl_s)

    def on_request_done(self, num_input_tokens: int, num_output_tokens: int) -> None:
        self._core.calls.append(("on_request_done", (num_input_tokens, num_output_tokens), None))

    def on_idle(self) -> None:
        self._core.calls.append(("on_idle", (), None))


def engine_main(conn: Any, engine_dir: str, device: str | None, gpu_device_ids: str | None,
                overrides: dict[str, Any], liveness: Any, parent_pid: int) -> None:
    """Body of the engine process: load the engine, tell the serving process, serve it until told to stop."""
    from enginesmith.runtime.engine.engine import Engine
    from enginesmith.runtime.parallel.liveness import watch_parent

    watch_parent(parent_pid, "the engine process")
    core = EngineCore(conn)
    try:
        engine = Engine.from_engine_dir(engine_dir, device=device or serving_device(gpu_device_ids),
                                        on_rank_failure=core.rank_failed, liveness=liveness, **overrides)
    except ValueError as e:  # EngineConfigError included: the engine directory or an option is wrong
        conn.send(("error", "config", str(e)))
        return
    except Exception as e:
        log.exception("the engine process could not load %s", engine_dir)
        conn.send(("error", "load", f"the engine process could not load {engine_dir}: {type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    core.serve(engine)
