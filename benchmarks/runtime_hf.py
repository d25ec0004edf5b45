"""The transformers baselines of benchmarks/runtime.py, on the very weights of our RankModel.

`hf_llama_sharing(model)` builds a LlamaForCausalLM (sdpa) whose parameters are views of the
RankModel's tensors (q/k/v are row slices of the fused qkv), so both runtimes compute the same
function and the comparison costs no second copy of the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from enginesmith.runtime.model.model import RankModel

Progress = Callable[[str], None]


def hf_llama_sharing(model: RankModel):
    """A transformers Llama sharing `model`'s weights (tp=pp=1, dense)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    if c.is_moe or c.mapping.world_size != 1:
        raise ValueError("hf_llama_sharing needs a dense single-rank model")
    hc = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_size, rms_norm_eps=c.norm_epsilon,
        max_position_embeddings=c.max_position_embeddings, attention_bias=c.attn_bias,
        rope_parameters={"rope_type": "default", "rope_theta": c.rotary_base}, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hc._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(hc)
    hf.requires_grad_(False)
    hf.load_state_dict(_state_dict(model), strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hc).to(model.device)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers model still has meta tensors: {left[:5]}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def _state_dict(model: RankModel) -> dict[str, torch.Tensor]:
    d, nq, nkv = model.head_size, model.num_heads, model.num_kv_heads
    sd = {"model.embed_tokens.weight": model.embedding, "model.norm.weight": model.ln_f,
          "lm_head.weight": model.lm_head[: model.cfg.vocab_size]}
    for i, w in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = w.qkv.split([nq * d, nkv * d, nkv * d])
        sd |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
               p + "self_attn.o_proj.weight": w.dense, p + "mlp.gate_proj.weight": w.fc,
               p + "mlp.up_proj.weight": w.gate, p + "mlp.down_proj.weight": w.proj,
               p + "input_layernorm.weight": w.input_layernorm, p + "post_attention_layernorm.weight": w.post_layernorm}
        if w.qkv_bias is not None:
            qb, kb, vb = w.qkv_bias.split([nq * d, nkv * d, nkv * d])
            sd |= {p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb}
    return sd


@torch.inference_mode()
def static_generate(hf, prompts: list[list[int]], osls: list[int], batch_size: int, budget_s: float,
                    progress: Progress) -> dict:
    """`generate` over fixed batches in arrival order (left-padded, run to the batch's longest output).
    Stops starting batches once `budget_s` is spent; throughput counts each request's own output length."""
    device = hf.device
    _generate(hf, [prompts[0][:8]], 2, device)  # warm-up: cuBLAS handles, kernels
    _sync(device)
    start, useful, done, padded = time.perf_counter(), 0, 0, 0
    for i in range(0, len(prompts), batch_size):
        ps, os_ = prompts[i: i + batch_size], osls[i: i + batch_size]
        out = _generate(hf, ps, max(os_), device)
        _sync(device)
        useful += sum(os_)
        padded += out.shape[0] * (out.shape[1] - max(map(len, ps)))
        done += len(ps)
        elapsed = time.perf_counter() - start
        progress(f"transformers static generate: {done}/{len(prompts)} requests, {elapsed:.1f} s")
        if elapsed > budget_s:
            break
    elapsed = time.perf_counter() - start
    return dict(batch_size=batch_size, requests_measured=done, complete=done == len(prompts), elapsed_s=elapsed,
                output_tokens=useful, generated_tokens_incl_padding=padded, tok_s=useful / elapsed)


def _generate(hf, prompts: list[list[int]], max_new: int, device) -> torch.Tensor:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    return hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                       min_new_tokens=max_new, do_sample=False, pad_token_id=0)


CB_MAX_REQUESTS = 32
"""Requests per batch when `cb_options` is None and flash-attn is absent. transformers then runs paged SDPA: one
dense SDPA over the whole packed batch with a block-diagonal mask, so a step costs ~ batch tokens x batch KV tokens.
With its own defaults (8192 batch tokens, KV cache = 90% of free memory, every request admitted) replaying its
scheduler on the 256-request Llama-3-8B workload puts the first finished request at step 69, after ~24 PFLOP of
attention (~80 s at an assumed 350 TFLOP/s): hence 0 finished in 40 s. 32 gave the best such estimate."""
CB_MAX_REQUESTS_FLASH = 256
"""Requests per batch when flash-attn is installed (transformers switches to it; attention is then varlen)."""
CB_MAX_BATCH_TOKENS = 2048
"""Query tokens per step when `cb_options` is None (bounds the prefill chunk against the batch's KV)."""
CB_MEMORY_FRACTION = 0.5
"""Share of free device memory the default KV cache and attention mask may take (SDPA's temporaries need the rest)."""


@torch.no_grad()  # the manager thread updates its tensors outside inference mode
def continuous_batching(hf, prompts: list[list[int]], osls: list[int], budget_s: float, progress: Progress,
                        cb_options: dict | None = None, keep_tokens: bool = False) -> dict:
    """transformers' own continuous batching: the ContinuousBatchingManager that `generate_batch` drives, used
    directly so the run can be cut at `budget_s` (hard stop; tokens of unfinished requests are counted apart).
    Greedy, EOS disabled, request i asks for exactly osls[i] tokens. `cb_options`: ContinuousBatchingConfig
    fields (block_size/page_size accepted on either version); None sizes the cache for this workload
    (`default_cb_options`). Failures come back under `error`, never as an exception."""
    import transformers

    out: dict = dict(api="ContinuousBatchingManager", transformers=transformers.__version__)
    if not hasattr(hf, "init_continuous_batching"):
        return out | dict(error=f"transformers {transformers.__version__} has no continuous batching")
    try:
        out["cb_options"] = dict(cb_options) if cb_options is not None else default_cb_options(hf, prompts, osls)
        return out | _run_manager(hf, prompts, osls, budget_s, progress, _cb_config(out["cb_options"]), keep_tokens)
    except Exception as e:  # an API change or OOM in the baseline must not lose the caller's other numbers
        return out | dict(error=f"{type(e).__name__}: {e}")


def default_cb_options(hf, prompts: list[list[int]], osls: list[int]) -> dict:
    """A KV cache for CB_MAX_REQUESTS requests of the workload's longest length (plus the FIFO scheduler's 15%
    safety margin), capped to CB_MEMORY_FRACTION of the free memory of `hf`'s device."""
    c, block = hf.config, _block_size()
    requests = min(len(prompts), CB_MAX_REQUESTS_FLASH if _flash_available(hf.device) else CB_MAX_REQUESTS)
    blocks_per_request = -(-max(len(p) + n for p, n in zip(prompts, osls, strict=True)) // block) + 1
    want = -(-requests * blocks_per_request * 100 // 85)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = hf.dtype.itemsize * (2 * c.num_hidden_layers * c.num_key_value_heads * head_dim + CB_MAX_BATCH_TOKENS)
    fits = int(_free_memory(hf.device) * CB_MEMORY_FRACTION) // (per_token * block)
    if fits < blocks_per_request:
        raise RuntimeError(f"only {fits} KV blocks of {block} tokens fit in free memory; the longest request needs "
                           f"{blocks_per_request}: pass cb_options with a smaller max_batch_tokens")
    return dict(num_blocks=min(want, fits), max_batch_tokens=CB_MAX_BATCH_TOKENS, max_requests_per_batch=requests)


def _run_manager(hf, prompts, osls, budget_s, progress: Progress, cbc, keep_tokens: bool) -> dict:
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    gc = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(osls))
    manager = hf.init_continuous_batching(generation_config=gc, continuous_batching_config=cbc,
                                          workload_hints=_workload_hints(prompts, osls))
    attn = hf.config._attn_implementation
    finished: dict[str, list[int]] = {}
    start, end, error = t0, None, None
    try:
        if hf.device.type == "cuda":
            manager.warmup()  # CUDA graphs / compile, if this configuration uses them
        manager.start()
        start = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, osls, strict=True)):
            manager.add_request(input_ids=list(p), request_id=f"r{i}", max_new_tokens=n)
        error = _collect(manager, finished, len(prompts), start + budget_s, progress)
        end = time.perf_counter()
    finally:
        manager.stop(block=True, timeout=60, hard_stop=len(finished) < len(prompts))
        unfinished = _drain(manager, finished)
        end = end or time.perf_counter()
        if manager.is_running():
            error = "transformers' generation thread still runs 60 s after a hard stop"
        manager.destroy()
    ids = [f"r{i}" for i in range(len(prompts))]
    tokens, partial = sum(map(len, finished.values())), sum(map(len, unfinished.values()))
    counts = [len(finished.get(r, unfinished.get(r, []))) for r in ids]
    res = dict(requests_finished=len(finished), complete=len(finished) == len(prompts), elapsed_s=end - start,
               setup_s=start - t0, output_tokens=tokens, unfinished_tokens=partial,
               tok_s=(tokens + partial) / max(end - start, 1e-9), attn_implementation=attn, tokens_per_request=counts,
               wrong_length=sum(r in finished and c != n for r, c, n in zip(ids, counts, osls, strict=True)))
    if keep_tokens:
        res["tokens"] = [finished.get(r) for r in ids]
    return res | (dict(error=error) if error else {})


def _collect(manager, finished: dict, n: int, deadline: float, progress: Progress) -> str | None:
    """Gathers finished outputs into `finished` until all `n` are in or `deadline` passes. Returns an error."""
    last = time.perf_counter()
    while len(finished) < n and time.perf_counter() < deadline:
        res = manager.get_result(timeout=max(0.01, min(1.0, deadline - time.perf_counter())))
        if res is None:
            if not manager.is_running():
                fatal = manager.background_thread_status.fatal_error
                return f"transformers' continuous batching thread stopped: {fatal!r}"
        elif res.is_finished():
            if res.error:
                return f"request {res.request_id} failed: {res.error}"
            finished[res.request_id] = list(res.generated_tokens)
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            progress(f"transformers continuous batching: {len(finished)}/{n} requests")
    return None


def _drain(manager, finished: dict) -> dict[str, list[int]]:
    """After a stop: outputs still queued (a hard stop fails unfinished requests with their partial tokens)."""
    rest: dict[str, list[int]] = {}
    while (res := manager.get_result(timeout=0.05)) is not None:
        if res.request_id not in finished:
            rest[res.request_id] = list(res.generated_tokens)
    return rest


def _cb_config(options: dict):
    """ContinuousBatchingConfig(**options), mapping block_size (<= 5.2x) and page_size (later) onto each other."""
    import dataclasses

    import transformers
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    opts = dict(options)
    if "block_size" in opts and "page_size" in names:
        opts["page_size"] = opts.pop("block_size")
    elif "page_size" in opts and "page_size" not in names:
        opts["block_size"] = opts.pop("page_size")
    unknown = sorted(set(opts) - names)
    if unknown:
        raise ValueError(f"cb_options {unknown} are not ContinuousBatchingConfig fields in transformers "
                         f"{transformers.__version__}; use some of {sorted(names)}")
    return ContinuousBatchingConfig(**opts)


def _block_size() -> int:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    c = ContinuousBatchingConfig()
    return getattr(c, "page_size", None) or c.block_size


def _workload_hints(prompts: list[list[int]], osls: list[int]):
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        return None
    return WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(osls),
                         num_requests=len(prompts))


def _flash_available(device: torch.device) -> bool:
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    return device.type == "cuda" and (is_flash_attn_3_available() or is_flash_attn_2_available())


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
