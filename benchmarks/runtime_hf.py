"""The transformers baselines of benchmarks/runtime.py, on the very weights of our RankModel.

`hf_llama_sharing(model)` builds a LlamaForCausalLM (sdpa) whose parameters are views of the
RankModel's tensors (q/k/v are row slices of the fused qkv), so both runtimes compute the same
function and the comparison costs no second copy of the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from runtime.model import RankModel

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


@torch.no_grad()  # the manager thread updates its tensors outside inference mode
def continuous_batching(hf, prompts: list[list[int]], osls: list[int], budget_s: float, progress: Progress,
                        cb_options: dict | None = None) -> dict:
    """transformers' own continuous batching (ContinuousBatchingManager), if this version has it.
    `cb_options`: ContinuousBatchingConfig fields (None: transformers sizes the cache from free memory)."""
    if not hasattr(hf, "continuous_batching_context_manager"):
        import transformers

        return dict(error=f"transformers {transformers.__version__} has no continuous batching")
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gc = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(osls))
    cbc = ContinuousBatchingConfig(**(cb_options or {}))
    results: dict[str, int] = {}
    cm = hf.continuous_batching_context_manager(generation_config=gc, block=True, timeout=10,
                                                continuous_batching_config=cbc, warmup=hf.device.type == "cuda")
    with cm as manager:
        start = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, osls, strict=True)):
            manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=n)
        last = start
        while len(results) < len(prompts) and time.perf_counter() - start < budget_s:
            res = manager.get_result(timeout=1)
            if res is not None and res.is_finished():
                if res.error:
                    raise RuntimeError(f"continuous batching request {res.request_id} failed: {res.error}")
                results[res.request_id] = len(res.generated_tokens)
            elif res is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped")
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                progress(f"transformers continuous batching: {len(results)}/{len(prompts)} requests")
        elapsed = time.perf_counter() - start
    tokens = sum(results.values())
    return dict(requests_finished=len(results), complete=len(results) == len(prompts), elapsed_s=elapsed,
                output_tokens=tokens, tok_s=tokens / elapsed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
