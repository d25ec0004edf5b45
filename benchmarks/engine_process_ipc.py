"""What the engine process's transport costs per engine step, on CPU, with no model (runtime/engine/engine_process.py).

    python -m benchmarks.engine_process_ipc                    # decode steps of 1, 64 and 256 rows
    python -m benchmarks.engine_process_ipc --rows 256 --steps 2000

A spawned process plays the engine: each step, every row gets one token (its on_update callback and an
on_token metrics call, as the engine makes them), then one on_iteration call, then EngineCore.flush sends the
step as one message. The calling process plays the Triton stub: EngineProcess's receiver applies each message to
its Request mirrors (their on_update does nothing) and replays the metrics calls on a hook that does nothing.
Reported per step: the engine side's time (what its loop pays: the callbacks, which the engine also makes when it
runs in the stub's thread, then the pickling and the send), the serving side's time in the receiver (unpickling,
applying, replaying), and the wall time per step with both running (pipelined).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import threading
import time

from enginesmith.runtime.engine.engine_config import EngineConfig
from enginesmith.runtime.engine.engine_process import EngineCore, EngineProcess, MetricsCalls
from enginesmith.runtime.engine.request import Request, TokenUpdate


def engine_side(conn, rows: int, steps: int) -> None:
    """The engine's share of each step, timed; sends ("done", ns per step) last."""
    core = EngineCore(conn)
    metrics = MetricsCalls(core)
    reqs = [Request([1, 2, 3], 10**6) for _ in range(rows)]
    conn.send(("ready",))
    conn.recv()  # go
    spent = sending = 0
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        for key, r in enumerate(reqs):
            r.tokens.append(7)
            r.log_probs.append(-1.5)
            metrics.on_token(0.01)
            core._updated(key, TokenUpdate(r, [7], [-1.5], False))
        metrics.on_iteration(rows, 0, rows, 40, 60, rows, 0, num_context_tokens=0, paused=0, kv_reused_blocks=0,
                             kv_missed_blocks=0)
        t1 = time.perf_counter_ns()
        core.flush()
        t2 = time.perf_counter_ns()
        spent += t2 - t0
        sending += t2 - t1
    conn.send(("done", (spent / steps, sending / steps)))
    conn.recv()  # the other side has read everything


class _Nothing:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _TimedClient(EngineProcess):
    """The serving side, timing the receiver's work per message."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handled_ns: list[int] = []
        self.engine_ns: tuple[float, float] | None = None
        self.finished = threading.Event()

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "done":
            self.engine_ns = msg[1]
            self.finished.set()
            return
        t0 = time.perf_counter_ns()
        super()._handle(msg)
        self.handled_ns.append(time.perf_counter_ns() - t0)


def measure(rows: int, steps: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=engine_side, args=(child_conn, rows, steps))
    proc.start()
    child_conn.close()
    conn.recv()  # the engine side has started
    client = _TimedClient(proc, conn, EngineConfig(), vocab_size=32000, num_blocks=100)
    client.metrics = _Nothing()
    for key in range(rows):
        client._live[key] = Request([1, 2, 3], 10**6, on_update=lambda update: None)
    receiver = threading.Thread(target=client._receive, daemon=True)
    receiver.start()
    t0 = time.perf_counter()
    conn.send(("go",))
    client.finished.wait(600)
    wall = time.perf_counter() - t0
    client._stopping = True  # the end of the pipe that follows is expected
    conn.send(("bye",))
    proc.join(10)
    handled = client.handled_ns
    return dict(rows=rows, steps=steps, engine_us_per_step=client.engine_ns[0] / 1e3,
                engine_flush_us_per_step=client.engine_ns[1] / 1e3,
                receiver_us_per_step=statistics.mean(handled) / 1e3,
                receiver_p99_us=sorted(handled)[int(0.99 * (len(handled) - 1))] / 1e3,
                wall_us_per_step=wall / steps * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,64,256", help="rows (requests) per step, comma-separated")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    results = [measure(int(r), args.steps) for r in args.rows.split(",")]
    for r in results:
        print(f"{r['rows']:4d} rows: engine side {r['engine_us_per_step']:8.1f} us/step (pickle + send "
              f"{r['engine_flush_us_per_step']:.1f}), receiver "
              f"{r['receiver_us_per_step']:8.1f} us/step (p99 {r['receiver_p99_us']:.1f}), wall "
              f"{r['wall_us_per_step']:8.1f} us/step")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
