"""Tiny random Hugging Face models and a locally trained tokenizer (no network, fixed seeds).

Used by `make demo` and the tests: the shapes are chosen to hit the hard cases of conversion
(GQA with tp > kv heads, an odd layer count for uneven PP, a vocab no tp divides, qkv bias, MoE).
"""

from __future__ import annotations

from pathlib import Path

# Enough varied English for a byte-level BPE of a few hundred tokens.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Large language models are served with in-flight batching, paged key-value caches and tensor parallelism.
Pipeline parallelism splits the layers into stages; tensor parallelism splits each matrix across GPUs.
Experts in a mixture-of-experts layer are spread over ranks; a router picks the top two for each token.
Triton Inference Server streams tokens back to the client as soon as they are generated.
Once upon a time there was a little robot who wanted to learn how to write poems about the sea.
Hello world! How are you today? I am fine, thank you. What is the capital of France? Paris is.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Unicode: café, naïve, 東京, emoji 🙂 and ümlauts.
""" * 4

ARCH_DEFAULTS: dict[str, dict] = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        hidden_act="silu",
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        hidden_act="silu", use_sliding_window=False,
    ),
    "mixtral": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=64, intermediate_size=96,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False,
        num_local_experts=8, num_experts_per_tok=2, hidden_act="silu", sliding_window=None,
    ),
}

TOKENIZER_VOCAB = 300
MODEL_VOCAB = 315  # > tokenizer vocab, and not divisible by 2, 4 or 8


def make_tokenizer(out_dir: str | Path, vocab_size: int = TOKENIZER_VOCAB):
    """Train a byte-level BPE tokenizer on a built-in corpus and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, dtype: str = "float32",
                    **overrides) -> Path:
    """Write a random-weight HF model (safetensors + config) and tokenizer to `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {sorted(ARCH_DEFAULTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    params = {**ARCH_DEFAULTS[arch], "vocab_size": MODEL_VOCAB, **overrides}
    params.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random init has tiny std; widen it so logits differ clearly between tokens
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
            else:  # norms and biases: not all ones/zeros, so a missing norm or bias shows
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in _ else
                        0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out), safe_serialization=True)
    return out
