"""One rank's share of a Llama-family model, loaded from the converter's `rank{N}.safetensors`.

The model has no communication in it (gpt-fast style): every block returns its TP-partial output and
the caller reduces it (`runtime/model/emulate.py` in one process, `runtime/parallel/workers.py` across processes).
Tokens are packed: a step holds T tokens of several sequences, as TensorRT-LLM's remove_input_padding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from enginesmith.builders.mapping import RankCoords, ep_experts, pp_layers
from enginesmith.runtime.model.checkpoint import CheckpointConfig, CheckpointError
from enginesmith.runtime.model.layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq, swiglu

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LAYER_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")


@dataclass
class LayerWeights:
    input_layernorm: torch.Tensor
    qkv: torch.Tensor  # (q_local + 2 * kv_local) * d, H
    qkv_bias: torch.Tensor | None
    dense: torch.Tensor  # H, q_local * d
    post_layernorm: torch.Tensor
    fc: torch.Tensor  # dense: I/tp, H (HF gate_proj) | MoE: E_local, 2*I/moe_tp, H (up then gate)
    gate: torch.Tensor | None  # dense: I/tp, H (HF up_proj)
    proj: torch.Tensor  # dense: H, I/tp | MoE: E_local, H, I/moe_tp
    router: torch.Tensor | None  # E, H float32
    gate_up: torch.Tensor | None = None  # dense: [fc; gate] (2*I/tp, H); fc and gate are views into it

    def __post_init__(self) -> None:
        # One GEMV for both halves at decode: fc and gate become views of one contiguous weight.
        if self.gate is not None and self.gate_up is None and self.fc.dim() == 2:
            self.gate_up = torch.cat([self.fc, self.gate])
            self.fc, self.gate = self.gate_up.split(self.fc.shape[0])


class RankModel:
    """Weights and forward pieces of one global rank (its PP stage, its TP/EP slice)."""

    def __init__(self, cfg: CheckpointConfig, coords: RankCoords, tensors: dict[str, torch.Tensor],
                 device: torch.device, dtype: torch.dtype):
        self.cfg, self.coords, self.device, self.dtype = cfg, coords, device, dtype
        m = cfg.mapping
        self.global_layers = pp_layers(cfg.num_hidden_layers, m.pp_size, coords.pp_rank)
        self.is_first_stage = coords.pp_rank == 0
        self.is_last_stage = coords.pp_rank == m.pp_size - 1
        self.num_heads = cfg.num_attention_heads // m.tp_size
        self.num_kv_heads = -(-cfg.num_key_value_heads // m.tp_size)
        self.head_size = cfg.head_size
        self.experts = ep_experts(cfg.num_experts, m.moe_ep_size, coords.moe_ep_rank) if cfg.is_moe else range(0)
        self.inv_freq = rope_inv_freq(cfg.head_size, cfg.rotary_base, cfg.rotary_scaling).to(device)
        self.embedding = tensors.pop("transformer.vocab_embedding.weight", None)
        self.ln_f = tensors.pop("transformer.ln_f.weight", None)
        self.lm_head = tensors.pop("lm_head.weight", None)
        if self.is_last_stage and self.lm_head is None and self.embedding is not None:
            self.lm_head = self.embedding  # tied embeddings on a single-stage model
        self.layers = [self._layer(tensors, i) for i in range(len(self.global_layers))]
        self._check_stage_tensors()

    @classmethod
    def load(cls, ckpt_dir: str | Path, rank: int, device: str | torch.device = "cpu",
             dtype: torch.dtype | str | None = None) -> RankModel:
        """Read config.json and this rank's file only; weights are cast to `dtype` (default: checkpoint's)."""
        from safetensors import safe_open

        cfg = CheckpointConfig.from_dir(ckpt_dir)
        path = Path(ckpt_dir) / f"rank{rank}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (mapping world_size={cfg.mapping.world_size})")
        device = torch.device(device)
        dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or DTYPES[cfg.dtype])
        raw: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                raw[k] = f.get_tensor(k)
        tensors = _dequantize(raw, cfg.quant_algo)
        for k, t in tensors.items():
            keep_fp32 = k.endswith("mlp.router.weight")
            tensors[k] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
        return cls(cfg, cfg.mapping.rank_coords(rank), tensors, device, dtype)

    def _layer(self, t: dict[str, torch.Tensor], i: int) -> LayerWeights:
        p = f"transformer.layers.{i}."
        try:
            return LayerWeights(
                input_layernorm=t.pop(p + "input_layernorm.weight"), qkv=t.pop(p + "attention.qkv.weight"),
                qkv_bias=t.pop(p + "attention.qkv.bias", None), dense=t.pop(p + "attention.dense.weight"),
                post_layernorm=t.pop(p + "post_layernorm.weight"), fc=t.pop(p + "mlp.fc.weight"),
                gate=t.pop(p + "mlp.gate.weight", None), proj=t.pop(p + "mlp.proj.weight"),
                router=t.pop(p + "mlp.router.weight", None),
            )
        except KeyError as e:
            raise CheckpointError(f"rank{self.coords.rank}.safetensors lacks {e.args[0]}") from None

    def _check_stage_tensors(self) -> None:
        r = self.coords.rank
        if self.is_first_stage and self.embedding is None:
            raise CheckpointError(f"rank{r} is on the first PP stage but has no transformer.vocab_embedding.weight")
        if self.is_last_stage and (self.ln_f is None or self.lm_head is None):
            raise CheckpointError(f"rank{r} is on the last PP stage but lacks transformer.ln_f / lm_head")

    @property
    def num_local_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, H) hidden states."""
        return F.embedding(input_ids.to(self.device), self.embedding)

    def rope(self, positions: torch.Tensor):
        """cos/sin tables for these positions, computed once per step and shared by all layers."""
        return rope_cos_sin(positions.to(self.device), self.inv_freq, self.dtype)

    def attention_partial(self, i: int, hidden: torch.Tensor, positions: torch.Tensor, attn,
                          rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Local layer i's attention block; returns this rank's TP-partial (T, H)."""
        w = self.layers[i]
        x = rms_norm(hidden, w.input_layernorm, self.cfg.norm_epsilon)
        qkv = F.linear(x, w.qkv, w.qkv_bias)
        d, nq, nkv = self.head_size, self.num_heads, self.num_kv_heads
        q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
        q, k, v = q.view(-1, nq, d), k.view(-1, nkv, d), v.reshape(-1, nkv, d)
        cos, sin = rope if rope is not None else self.rope(positions)
        out = attn(i, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # (T, nq, d)
        return F.linear(out.reshape(out.shape[0], nq * d), w.dense)

    def mlp_partial(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Local layer i's MLP (or MoE) block; returns this rank's TP-partial (T, H)."""
        w = self.layers[i]
        x = rms_norm(hidden, w.post_layernorm, self.cfg.norm_epsilon)
        if w.router is None:
            return F.linear(swiglu(F.linear(x, w.fc), F.linear(x, w.gate)), w.proj)
        return self._moe(w, x)

    def _moe(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        # Router in float32 over all experts (replicated); softmax -> top-k -> renormalize (Mixtral).
        probs = F.softmax(F.linear(x.float(), w.router), dim=-1)  # (T, E)
        top_p, top_e = probs.topk(self.cfg.moe_top_k, dim=-1)
        if self.cfg.moe_normalization_mode == 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        inter = w.fc.shape[1] // 2
        for local, e in enumerate(self.experts):
            hit = top_e == e  # (T, k)
            tokens = hit.any(-1).nonzero(as_tuple=True)[0]
            if tokens.numel() == 0:
                continue
            xe = x[tokens]
            up, gate = w.fc[local, :inter], w.fc[local, inter:]
            ye = F.linear(swiglu(F.linear(xe, gate), F.linear(xe, up)), w.proj[local])
            weight = (top_p * hit).sum(-1)[tokens].to(x.dtype)
            out.index_add_(0, tokens, ye * weight[:, None])
        return out

    def final_logits_shard(self, hidden: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, V_pad / tp) float32 logits of this rank's vocab slice."""
        x = rms_norm(hidden, self.ln_f, self.cfg.norm_epsilon)
        return F.linear(x, self.lm_head).float()


def _dequantize(raw: dict[str, torch.Tensor], quant_algo: str | None) -> dict[str, torch.Tensor]:
    """Turn weight-only quantized tensors (int8 weight + per_channel_scale) back into float weights."""
    if quant_algo not in ("W8A16", "W4A16"):
        return raw
    from enginesmith.builders.convert.quantize import dequantize_weight_only

    out: dict[str, torch.Tensor] = {}
    for k, t in raw.items():
        if k.endswith(".per_channel_scale"):
            continue
        prefix = k[: -len("weight")]
        scale_key = prefix + "per_channel_scale"
        if k.endswith(".weight") and scale_key in raw:
            out[k] = dequantize_weight_only({"weight": t, "per_channel_scale": raw[scale_key]}, quant_algo)
        else:
            out[k] = t
    return out
