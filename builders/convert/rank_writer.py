"""Stream a rank's TensorPlans into `rank{N}.safetensors`, block by block.

Float tensors never sit whole in memory: rows whose dtype and width already match are byte ranges the
writer copies through a 1 MiB buffer (read, hashed and written while in cache); column slices are copied
out of a bounded memory map into one reused buffer per worker, and casts are `pread` in row blocks into
that buffer and converted block by block. A
weight-only quantized matrix is the one thing held whole (per expert for MoE), read through
`safe_open.get_slice`. A `MemoryGate` shared by the worker threads caps what all ranks hold at once, so
peak memory is a constant plus the largest quantized matrix, never a whole rank or model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from enginesmith.builders.convert import quantize
from enginesmith.builders.convert.errors import ConvertError
from enginesmith.builders.convert.memory_gate import MemoryGate
from enginesmith.builders.convert.rank_plan import Read, TensorPlan, Zeros
from enginesmith.builders.convert.safetensors_stream import DTYPE_SIZES, DTYPE_TAGS, SourceRange, write_streaming
from enginesmith.builders.convert.source import FLOAT_DTYPES, HFSource

if TYPE_CHECKING:
    import torch

UNLIMITED = MemoryGate(1 << 62)
COPY_BLOCK = 1 << 20
"""Read buffer per worker; a block's cast output is at most twice that (bfloat16 -> float32)."""


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def piece_cost(piece: Read | Zeros, source: HFSource, dtype: str) -> int:
    """Bytes a piece holds while in flight: the source pages it touches, plus its output tensor when that
    is a copy (a dtype cast or a column slice) rather than a view on the map."""
    out = _numel(piece.shape) * DTYPE_SIZES[DTYPE_TAGS[dtype]]
    if isinstance(piece, Zeros):
        return out
    copied = piece.cols is not None or FLOAT_DTYPES.get(source.info(piece.source)[0]) != dtype
    return source.nbytes_touched(piece.source, piece.rows) + (out if copied else 0)


def group_cost(pieces: tuple[Read | Zeros, ...], source: HFSource, dtype: str) -> int:
    """A quantized matrix: its pieces, their float32 concatenation and quantization temporaries."""
    return sum(piece_cost(p, source, dtype) + 3 * 4 * _numel(p.shape) for p in pieces)


def plan_groups(plan: TensorPlan) -> list[tuple[Read | Zeros, ...]]:
    """Pieces quantized together: one matrix, or one expert of a stacked MoE weight."""
    per = len(plan.pieces) // plan.batch
    return [plan.pieces[b * per:(b + 1) * per] for b in range(plan.batch)]


def max_cost(plans: list[TensorPlan], source: HFSource) -> int:
    """Largest single hold of these plans (a quantized matrix, or the streaming buffers)."""
    costs = [group_cost(g, source, p.dtype) for p in plans if p.quant_algo for g in plan_groups(p)]
    return max(costs + [3 * COPY_BLOCK])


def materialize(piece: Read | Zeros, source: HFSource, dtype: str) -> torch.Tensor:
    """One piece in the output dtype; float16 overflow is an error, not a silent inf."""
    import torch

    target = getattr(torch, dtype)
    if isinstance(piece, Zeros):
        return torch.zeros(piece.shape, dtype=target)
    t = source.read(piece.source, piece.rows, piece.cols)
    if tuple(t.shape) != piece.shape:
        raise ConvertError(f"{piece.source}: slice has shape {list(t.shape)}, expected {list(piece.shape)}")
    if t.dtype == target:
        return t
    return _check_fp16(t.to(target), piece.source)


def _quantized(plan: TensorPlan, source: HFSource, gate: MemoryGate) -> Iterator[torch.Tensor]:
    """Quantize one matrix (or one expert) at a time; the small scale tensor follows the weight."""
    import torch

    scales = []
    for group in plan_groups(plan):
        with gate.hold(group_cost(group, source, plan.dtype)):
            w = torch.cat([materialize(p, source, plan.dtype) for p in group], dim=0)
            q = quantize.quantize_weight_only(w, plan.quant_algo)
            del w
            scales.append(q["per_channel_scale"])
            yield q.pop("weight")
            del q
    yield torch.stack(scales) if len(plan.shape) == 3 else scales[0]


def is_verbatim(piece: Read | Zeros, source: HFSource, dtype: str) -> bool:
    """Whole rows in the target dtype: the output bytes are a contiguous byte range of the source."""
    return (isinstance(piece, Read) and piece.cols is None
            and FLOAT_DTYPES.get(source.info(piece.source)[0]) == dtype)


def _check_fp16(t: torch.Tensor, name: str) -> torch.Tensor:
    import torch

    if t.dtype == torch.float16 and torch.isinf(t).any():
        raise ConvertError(f"{name} has values outside the float16 range; convert with dtype bfloat16 or "
                           "float32 instead")
    return t


def _blocks(piece: Read, source: HFSource, dtype: str, buffer: memoryview) -> Iterator[torch.Tensor | SourceRange]:
    """A piece as row blocks read into `buffer`: raw bytes when verbatim, else column-sliced and cast."""
    import torch

    if is_verbatim(piece, source, dtype):  # the writer copies it file-to-file (and hashes it on the way)
        yield SourceRange(*source.byte_range(piece.source, piece.rows))
        return
    src_dtype = getattr(torch, FLOAT_DTYPES[source.info(piece.source)[0]])
    target = getattr(torch, dtype)
    blocks = (source.read_row_blocks(piece.source, piece.rows, buffer) if piece.cols is None
              else source.read_col_blocks(piece.source, piece.rows, piece.cols, buffer))  # cols: packed per row
    for raw, n in blocks:
        if src_dtype == target:  # packed columns: written from the buffer before the next block is read
            yield raw
            continue
        block = torch.frombuffer(raw, dtype=src_dtype).view(n, *piece.shape[1:])
        out = block.to(target, copy=True)  # a copy: the buffer is reused for the next block
        yield _check_fp16(out, piece.source) if src_dtype != torch.float16 else out


def _plain(plan: TensorPlan, source: HFSource, gate: MemoryGate) -> Iterator[torch.Tensor | SourceRange]:
    """Stream a float tensor through one reused buffer; memory per worker is a constant (~3 blocks)."""
    import torch

    buffer = None
    for piece in plan.pieces:
        with gate.hold(3 * COPY_BLOCK):
            if isinstance(piece, Zeros):
                yield torch.zeros(piece.shape, dtype=getattr(torch, plan.dtype))
                continue
            size = max(COPY_BLOCK, source.row_bytes(piece.source))
            if buffer is None or len(buffer) < size:
                buffer = memoryview(bytearray(size))
            yield from _blocks(piece, source, plan.dtype, buffer)


def rank_chunks(plans: list[TensorPlan], source: HFSource, on_bytes: Callable[[int], None] | None = None,
                gate: MemoryGate = UNLIMITED) -> Iterator[torch.Tensor | SourceRange]:
    """Every byte of the rank's data section, in file order (tensors, or raw blocks copied verbatim)."""
    for plan in plans:
        for chunk in (_quantized if plan.quant_algo else _plain)(plan, source, gate):
            n = chunk.nbytes if isinstance(chunk, (memoryview, SourceRange)) else chunk.numel() * chunk.element_size()
            yield chunk
            del chunk
            if on_bytes:
                on_bytes(n)


def write_rank(path: str | Path, plans: list[TensorPlan], source: HFSource,
               metadata: dict[str, str] | None = None, on_bytes: Callable[[int], None] | None = None,
               gate: MemoryGate = UNLIMITED) -> str:
    """Write one rank file (temp name + rename); returns its sha256."""
    entries = [e for plan in plans for e in plan.entries()]
    return write_streaming(path, entries, rank_chunks(plans, source, on_bytes, gate), metadata)
