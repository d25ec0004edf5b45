"""Batch-1 greedy decode of one random-weight model: fast path vs plain path vs the HBM roofline.

Roofline: a decode token must read every weight it uses once (MoE: its top-k experts; the embedding:
one row) plus its sequence's K/V, so tokens/s <= copy bandwidth / those bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from enginesmith.runtime.fast.fast_decode import FastDecoder
from enginesmith.runtime.engine.kv_cache import PagedKVCache
from enginesmith.runtime.model.model import RankModel
from enginesmith.runtime.model.paged_attention import SeqSpan
from enginesmith.runtime.model.plain_step import plain_forward
from enginesmith.runtime.model.random_model import weight_bytes_per_token

Step = Callable[[int, int], torch.Tensor]  # (token, position) -> (1, V) logits
SEQ = 7


def make_cache(model: RankModel, max_tokens: int, tokens_per_block: int, batch: int = 1) -> PagedKVCache:
    blocks = batch * -(-max_tokens // tokens_per_block) + 1
    return PagedKVCache(num_layers=model.num_local_layers, num_kv_heads=model.num_kv_heads,
                        head_size=model.head_size, num_blocks=blocks, tokens_per_block=tokens_per_block,
                        dtype=model.dtype, device=model.device)


def greedy(step: Step, token: int, position: int, n: int) -> tuple[list[int], list[torch.Tensor], float]:
    """n greedy steps (each ends in a host read of the token, as a serving loop does); tokens, logits, seconds."""
    tokens, logits = [], []
    start = time.perf_counter()
    for j in range(n):
        out = step(token, position + j)
        token = int(out[0].argmax())
        tokens.append(token)
        logits.append(out[0])
    return tokens, logits, time.perf_counter() - start


def greedy_batch(dec: FastDecoder, first: list[int], start: int, steps: int, device, on_device: bool = False,
                 seqs: list[int] | None = None) -> tuple[list[list[int]], float]:
    """Greedy decode of sequences `seqs` (default 0..B-1; first tokens `first`) through a FastDecoder: (tokens per step,
    seconds). Host-synced, each step's tokens are read on the host before the next step (a serving loop's
    turn); on_device: the argmax stays on the GPU and feeds the next step, the tokens are read once at the
    end, and only the GPU's step time is left."""
    seqs = seqs or list(range(len(first)))
    toks = torch.tensor(first, device=device) if on_device else list(first)
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for j in range(steps):
        toks = dec.decode(seqs, toks, [start + j] * len(seqs)).argmax(-1)
        out.append(toks if on_device else toks.tolist())
    if on_device:
        out = torch.stack(out).tolist()
    return out, time.perf_counter() - t


def run(model: RankModel, *, copy_gbps: float, prompt_len: int, n_fast: int, n_plain: int, tokens_per_block: int,
        decoder_options: dict, progress: Callable[[str], None], baselines: dict[str, dict] | None = None) -> dict:
    """baselines: other FastDecoder option sets (name -> options over decoder_options) timed the same way
    in the same run, e.g. the cuBLAS regions path next to the fused GEMV kernels."""
    on_gpu = model.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    allocated_model = torch.cuda.memory_allocated() if on_gpu else 0  # the model's tensors, before any cache
    cache = make_cache(model, prompt_len + n_fast + 1, tokens_per_block)
    cache.reserve(SEQ, prompt_len + n_fast + 1)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=gen).tolist()
    first = int(plain_forward(model, cache, [SeqSpan(SEQ, 0, prompt_len)], prompt)[0].argmax())

    def plain(tok: int, pos: int) -> torch.Tensor:
        return plain_forward(model, cache, [SeqSpan(SEQ, pos, 1)], [tok])

    greedy(plain, first, prompt_len, 2)  # warm-up
    plain_tokens, plain_logits, plain_s = greedy(plain, first, prompt_len, n_plain)
    progress(f"plain path: {n_plain / plain_s:.1f} tok/s")

    t0 = time.perf_counter()
    dec = FastDecoder(model, cache, max_batch_size=1, max_seq_len=prompt_len + n_fast + 1, **decoder_options)

    def fast(tok: int, pos: int) -> torch.Tensor:
        return dec.decode([SEQ], [tok], [pos])

    greedy(fast, first, prompt_len, n_fast)  # warm-up: compiles and captures every bucket the run meets
    setup_s = time.perf_counter() - t0
    check = teacher_forced_check(fast, first, prompt_len, plain_tokens, plain_logits)
    fast_tokens, _, fast_s = greedy(fast, first, prompt_len, n_fast)
    fed_tokens, fed_s = greedy_batch(dec, [first], prompt_len, n_fast, model.device, on_device=True, seqs=[SEQ])
    progress(f"fast path: {n_fast / fast_s:.1f} tok/s, {n_fast / fed_s:.1f} with the token fed on the device "
             f"(setup {setup_s:.1f} s, {dec.status()['attention']} attention)")

    fast_status = dec.status()
    dec = None  # frees its graphs before the baselines capture theirs
    others = {}
    for name, opts in (baselines or {}).items():
        other = FastDecoder(model, cache, max_batch_size=1, max_seq_len=prompt_len + n_fast + 1,
                            **(decoder_options | opts))

        def step(tok: int, pos: int, other=other) -> torch.Tensor:
            return other.decode([SEQ], [tok], [pos])

        greedy(step, first, prompt_len, 8)
        other_check = teacher_forced_check(step, first, prompt_len, plain_tokens, plain_logits)
        _, _, s = greedy(step, first, prompt_len, n_fast)
        others[name] = dict(options=opts, tok_s=n_fast / s, ms_per_token=1e3 * s / n_fast, check=other_check,
                            status=other.status())
        progress(f"baseline {name}: {n_fast / s:.1f} tok/s")
        del other
    weights = weight_bytes_per_token(model)
    kv = (prompt_len + n_fast / 2) * PagedKVCache.bytes_per_token(model.num_local_layers, model.num_kv_heads,
                                                                   model.head_size, model.dtype)
    roof = copy_gbps * 1e9 / (weights + kv)
    fast_tok_s, plain_tok_s = n_fast / fast_s, n_plain / plain_s
    return dict(
        dtype=str(model.dtype).removeprefix("torch."), layers=model.num_local_layers, prompt_len=prompt_len,
        weight_bytes_per_token=weights, kv_bytes_per_token_avg=int(kv), copy_gbps=copy_gbps,
        roofline_tok_s=roof, fast=dict(tokens=n_fast, tok_s=fast_tok_s, ms_per_token=1e3 * fast_s / n_fast,
                                       pct_roofline=100 * fast_tok_s / roof, setup_s=setup_s, status=fast_status,
                                       device_fed=dict(tok_s=n_fast / fed_s, ms_per_token=1e3 * fed_s / n_fast,
                                                       pct_roofline=100 * n_fast / fed_s / roof,
                                                       same_tokens=[t[0] for t in fed_tokens] == fast_tokens)),
        plain=dict(tokens=n_plain, tok_s=plain_tok_s, ms_per_token=1e3 * plain_s / n_plain,
                   pct_roofline=100 * plain_tok_s / roof),
        baselines={k: v | dict(pct_roofline=100 * v["tok_s"] / roof, fast_speedup=fast_tok_s / v["tok_s"])
                   for k, v in others.items()},
        speedup_vs_plain=fast_tok_s / plain_tok_s, fast_vs_plain=check,
        greedy_prefix_match=_prefix(fast_tokens, plain_tokens),
        gpu_memory=dict(model_allocated_bytes=allocated_model,
                        kv_cache_bytes=cache.k.numel() * cache.k.element_size() * 2,
                        peak_allocated_bytes=torch.cuda.max_memory_allocated() if on_gpu else 0))


def teacher_forced_check(fast: Step, first: int, start: int, tokens: list[int],
                         logits: list[torch.Tensor]) -> dict:
    """Feed the plain path's tokens to the fast path: worst relative logit error and argmax agreement."""
    errs, agree = [], 0
    for j, ref in enumerate(logits):
        out = fast(first if j == 0 else tokens[j - 1], start + j)[0]
        errs.append(float((out - ref).norm() / ref.norm()))
        agree += int(out.argmax()) == int(ref.argmax())
    return dict(steps=len(logits), max_rel_err=max(errs), argmax_agreement=agree / len(logits))


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
