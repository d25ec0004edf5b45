"""Pure index maths of TensorRT-LLM's sharding rules (no tensors, no I/O).

Every function returns half-open `(start, stop)` ranges along one dimension of a Hugging Face tensor.
Sources: `tensorrt_llm/layers/{linear,attention,moe}.py`, `models/convert_utils.py` (see
`shared/reference/trtllm-checkpoint-and-build.md`, sections 2.1-2.6).
"""

from __future__ import annotations

from enginesmith.builders.mapping import kv_head_of_rank, pad_vocab_size

Span = tuple[int, int]


def even_span(size: int, parts: int, index: int) -> Span:
    """Chunk `index` of `size` split into `parts` equal pieces (`torch.chunk` with exact division)."""
    if size % parts:
        raise ValueError(f"{size} is not divisible by {parts}")
    n = size // parts
    return index * n, (index + 1) * n


def q_rows(num_heads: int, head_dim: int, tp_size: int, tp_rank: int) -> Span:
    """Rows of q_proj one TP rank holds: nh/tp consecutive heads."""
    start, stop = even_span(num_heads, tp_size, tp_rank)
    return start * head_dim, stop * head_dim


def kv_rows(num_kv_heads: int, head_dim: int, tp_size: int, tp_rank: int) -> Span:
    """Rows of k_proj/v_proj one TP rank holds.

    nkv >= tp: nkv/tp consecutive heads. nkv < tp: the heads are duplicated (`dup_kv_weight`), so each rank
    holds exactly one head, head `tp_rank * nkv // tp`.
    """
    if num_kv_heads >= tp_size:
        start, stop = even_span(num_kv_heads, tp_size, tp_rank)
    else:
        start = kv_head_of_rank(num_kv_heads, tp_size, tp_rank)
        stop = start + 1
    return start * head_dim, stop * head_dim


def vocab_rows(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[Span, int]:
    """lm_head rows of one rank and the zero rows appended after them (vocab padded to a multiple of tp)."""
    per_rank = pad_vocab_size(vocab_size, tp_size) // tp_size
    start = min(tp_rank * per_rank, vocab_size)
    stop = min(start + per_rank, vocab_size)
    return (start, stop), per_rank - (stop - start)
