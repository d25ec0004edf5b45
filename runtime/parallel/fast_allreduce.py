"""A low-latency TP all-reduce for decode-sized CUDA tensors (issue 6): PyTorch symmetric memory, one-shot.

Inside a CUDA graph NCCL spends ~25 us on an 8 KB all-reduce; the one-shot kernel of
`torch.distributed._symmetric_memory` has every rank read each peer's copy of the input straight out of
the peer's memory over NVLink (CUDA IPC / P2P) and sum locally, in one launch. Only the P2P ops are used
(one_shot_all_reduce[_copy], two_shot_all_reduce_out), never the multimem_* ones: NVLink multicast stays
off (TORCH_SYMM_MEM_DISABLE_MULTICAST=1 is forced before any symmetric allocation).

Setup is collective over the TP group: allocate one symmetric buffer of `max_bytes`, rendezvous, then check
each candidate op against dist.all_reduce on random data, eagerly and replayed from a CUDA graph. The ranks
agree (MIN over the group) after every stage, so they all take the fast path or all stay on NCCL; whatever
goes wrong (missing op, exception, wrong numbers) leaves `enabled` False with the reason in `status()`.
A kernel that never finishes (no P2P path) raises FastAllReduceHang instead: the stream is stuck, so no
fallback can run in this process. ENGINESMITH_FAST_ALLREDUCE=0 turns the fast path off.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
ENV_SWITCH = "ENGINESMITH_FAST_ALLREDUCE"
METHODS = ("one_shot_copy", "one_shot", "two_shot")
_OPS = {"one_shot_copy": "one_shot_all_reduce_copy", "one_shot": "one_shot_all_reduce",
        "two_shot": "two_shot_all_reduce_out"}
_ALIGN = 16  # bytes: the kernels' widest vector; smaller or odd tensors go to NCCL
_REL_TOL = 1e-2


class FastAllReduceHang(RuntimeError):
    """A symmetric-memory kernel did not finish: the GPU stream is stuck, NCCL cannot run after it either."""


class FastAllReduce:
    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int, *,
                 methods: tuple[str, ...] = METHODS, hang_timeout_s: float = 20.0):
        """Set up for `group` (the NCCL TP group) on `device`; collective: every rank of the group calls it."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.group, self.device, self.dtype = group, device, dtype
        self.max_bytes = max_bytes // _ALIGN * _ALIGN
        self.hang_timeout_s = hang_timeout_s
        self.method: str | None = None
        self.reason = ""
        self.checks: dict[str, dict] = {}
        self.info: dict = {}
        self.calls = {"fast": 0, "nccl": 0}
        self._buf = self._name = None
        try:
            self._setup(methods)
        except FastAllReduceHang:
            raise
        except Exception as e:  # never let the optional path take the run down: NCCL still works
            self._disable(f"setup failed: {type(e).__name__}: {str(e)[:400]}")

    @property
    def enabled(self) -> bool:
        return self.method is not None

    def status(self) -> dict:
        return dict(enabled=self.enabled, method=self.method, reason=self.reason, max_bytes=self.max_bytes,
                    dtype=str(self.dtype).removeprefix("torch."), checks=self.checks, calls=dict(self.calls),
                    **self.info)

    # ---- the collective ----
    def accepts(self, x: torch.Tensor) -> bool:
        """Whether `x` takes the fast path (a host-side test of shape and layout only, so every rank agrees)."""
        return (self.enabled and x.device == self.device and x.dtype == self.dtype and x.is_contiguous()
                and 0 < x.nbytes <= self.max_bytes and x.nbytes % _ALIGN == 0
                and (x.storage_offset() * x.element_size()) % _ALIGN == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the group; use the returned tensor (the fast path does not write `x`)."""
        if not self.accepts(x):
            self.calls["nccl"] += 1
            dist.all_reduce(x, group=self.group)
            return x
        self.calls["fast"] += 1
        return self._run(self.method, x)

    def _run(self, method: str, x: torch.Tensor) -> torch.Tensor:
        ops, flat = torch.ops.symm_mem, x.view(-1)
        sym = self._buf[: flat.numel()]
        if method == "one_shot_copy":  # the kernel copies x into the symmetric buffer itself: one launch
            return ops.one_shot_all_reduce_copy(sym, flat, "sum", self._name).view(x.shape)
        sym.copy_(flat)
        if method == "one_shot":
            return ops.one_shot_all_reduce(sym, "sum", self._name).view(x.shape)
        out = torch.empty_like(x)
        ops.two_shot_all_reduce_out(sym, "sum", self._name, out.view(-1))
        return out

    # ---- setup ----
    def _setup(self, methods: tuple[str, ...]) -> None:
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # before any symmetric allocation: no cuMulticast*
        self.info = dict(env={k: os.environ.get(k) for k in (ENV_SWITCH, "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                             "NCCL_NVLS_ENABLE")}, torch=torch.__version__)
        local = self._local_problem()
        if not self._agree(local is None, local):
            return
        import torch.distributed._symmetric_memory as symm_mem

        have = [m for m in methods if hasattr(torch.ops.symm_mem, _OPS[m])]
        self.info["ops_missing"] = [_OPS[m] for m in methods if m not in have]
        if not self._agree(bool(have), f"none of the ops {[_OPS[m] for m in methods]} exist in this torch"):
            return
        self._name = self.group.group_name
        self._stage("allocate", lambda: self._allocate(symm_mem))
        if self.reason:
            return
        self._stage("rendezvous", lambda: self._rendezvous(symm_mem))
        if self.reason:
            return
        for m in have:  # the first method that passes on every rank
            self.checks[m] = check = self._check(m)
            if self._all_ok(check["ok"]):
                self.method = m
                log.info("fast all-reduce: %s (max %d bytes)", m, self.max_bytes)
                return
        self._disable("no symmetric-memory all-reduce passed the self-check: "
                      + "; ".join(f"{m}: {c.get('error', c)}" for m, c in self.checks.items())[:600])

    def _local_problem(self) -> str | None:
        if os.environ.get(ENV_SWITCH, "1") == "0":
            return f"disabled by {ENV_SWITCH}=0"
        if self.device.type != "cuda":
            return f"device is {self.device.type}: the fast all-reduce needs CUDA"
        if self.dtype not in (torch.bfloat16, torch.float32):
            return f"dtype {self.dtype} (the symmetric-memory kernels take bfloat16 and float32)"
        if self.max_bytes < _ALIGN:
            return f"max_bytes {self.max_bytes} is too small"
        return None

    def _allocate(self, symm_mem) -> None:
        self._buf = symm_mem.empty(self.max_bytes // self.dtype.itemsize, dtype=self.dtype, device=self.device)
        self._buf.zero_()
        torch.cuda.synchronize(self.device)

    def _rendezvous(self, symm_mem) -> None:
        handle = symm_mem.rendezvous(self._buf, self._name)
        self.info["multicast_ptr"] = int(getattr(handle, "multicast_ptr", 0) or 0)
        backend = getattr(symm_mem, "get_backend", None)
        self.info["symm_mem_backend"] = backend(self.device) if backend else None
        if hasattr(handle, "barrier"):
            handle.barrier()
            self._wait("handle.barrier() after rendezvous")

    def _stage(self, name: str, fn) -> None:
        err = None
        try:
            fn()
        except FastAllReduceHang:
            raise
        except Exception as e:
            err = f"{name} failed: {type(e).__name__}: {str(e)[:400]}"
        self._agree(err is None, err or f"{name} failed on another rank")

    def _check(self, method: str) -> dict:
        """`method` against dist.all_reduce: eager at two sizes, then two chained calls in a CUDA graph."""
        out: dict = {"ok": False}
        try:
            n_max = self.max_bytes // self.dtype.itemsize
            errs = [self._compare(method, n) for n in sorted({min(n_max, 4096), n_max})]
            errs += self._compare_graph(method, min(n_max, 4096))
            out.update(ok=max(errs) < _REL_TOL, max_rel_err=max(errs))
            if not out["ok"]:
                out["error"] = f"relative error {max(errs):.3g} against dist.all_reduce"
        except FastAllReduceHang:
            raise
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        return out

    def _sample(self, n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed * 1000 + dist.get_rank(self.group))
        return torch.randn(n, generator=gen).to(self.device, self.dtype)

    def _compare(self, method: str, n: int) -> float:
        x = self._sample(n, n)
        keep, ref = x.clone(), x.clone()
        dist.all_reduce(ref, group=self.group)
        y = self._run(method, x)
        self._wait(f"{method} eager, {n} elements")
        if not torch.equal(x, keep):
            raise RuntimeError(f"{method} modified its input")
        return _rel_err(y, ref)

    def _compare_graph(self, method: str, n: int) -> list[float]:
        x = self._sample(n, 1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._run(method, self._run(method, x))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._wait(f"{method} warm-up before capture")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = self._run(method, x)
            z = self._run(method, y)  # the buffer is reused at once: checks the kernels' trailing barrier
        errs = []
        for seed in (2, 3):
            x.copy_(self._sample(n, seed))
            ref = x.clone()
            dist.all_reduce(ref, group=self.group)
            graph.replay()
            self._wait(f"{method} graph replay")
            ref_z = y.clone()
            dist.all_reduce(ref_z, group=self.group)
            errs += [_rel_err(y, ref), _rel_err(z, ref_z)]
        return errs

    def _all_ok(self, ok: bool) -> bool:
        return all_ranks_ok(self.group, ok, self.device)

    def _agree(self, ok: bool, reason: str | None) -> bool:
        """All ranks ok? If not, disable everywhere, naming this rank's reason."""
        if self._all_ok(ok):
            return True
        self._disable(reason if not ok else "another rank could not set up the fast all-reduce")
        return False

    def _disable(self, reason: str) -> None:
        self.method, self.reason, self._buf = None, reason, None
        log.warning("fast all-reduce off, TP all-reduce stays on NCCL: %s", reason)

    def _wait(self, what: str) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        deadline = time.monotonic() + self.hang_timeout_s
        while not ev.query():
            if time.monotonic() > deadline:
                raise FastAllReduceHang(f"{what} did not finish in {self.hang_timeout_s:.0f} s (no P2P path?)")
            time.sleep(1e-3)


def all_ranks_ok(group, ok: bool, device: torch.device) -> bool:
    """Whether every rank of the group is ok (MIN over the group: the ranks always decide alike)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return flag.item() == 1


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float().reshape(-1), ref.float().reshape(-1)
    if y.shape != ref.shape or not torch.isfinite(y).all():
        return float("inf")
    return float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
