"""The `trtllm-build` command line for a recipe + plan + GPU, every choice with its reason (pure).

Flags and values follow `trtllm-build` of TensorRT-LLM 1.2.x (`tensorrt_llm/commands/build.py`).
Parallelism is not a flag: trtllm-build reads it from the checkpoint's `mapping`, so `--tp_size`,
`--pp_size`, `--use_custom_all_reduce`, `--max_output_len` and the other removed flags never appear.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from enginesmith.builders.build.gpu import GpuArch

TRTLLM_BUILD = "trtllm-build"
# Flags that old tutorials pass but the 1.2.x parser no longer has ...
REMOVED_FLAGS = frozenset({
    "--tp_size", "--pp_size", "--world_size", "--use_custom_all_reduce", "--max_output_len",
    "--enable_xqa", "--multi_block_mode", "--use_context_fmha_for_generation",
    "--use_inflight_batching", "--parallel_build", "--gpus_per_node", "--auto_parallel",
})
# ... and flags it still parses but only to warn that they are deprecated.
DEPRECATED_FLAGS = frozenset({"--paged_kv_cache", "--gather_generation_logits"})


class BuildFlagError(ValueError):
    """Recipe values trtllm-build would reject."""


@dataclass(frozen=True, slots=True)
class FlagChoice:
    """One build decision: the flag, its value (None: left out) and why."""

    flag: str
    value: str | None
    reason: str

    @property
    def emitted(self) -> bool:
        return self.value is not None


def _limits(recipe) -> list[FlagChoice]:
    b = recipe.build
    if b.max_input_len > b.max_seq_len:
        raise BuildFlagError(f"build.max_input_len={b.max_input_len} exceeds build.max_seq_len={b.max_seq_len}; "
                             "lower max_input_len or raise max_seq_len")
    if b.max_num_tokens < b.max_input_len and not recipe.serve.enable_chunked_context:
        raise BuildFlagError(
            f"build.max_num_tokens={b.max_num_tokens} < build.max_input_len={b.max_input_len}: a long prompt "
            "would not fit one step; raise max_num_tokens or set serve.enable_chunked_context: true")
    # Mirror trtllm-build's check_max_num_tokens so the built config equals what we asked for.
    cap = b.max_batch_size * b.max_seq_len
    num_tokens = max(min(b.max_num_tokens, cap), b.tokens_per_block)
    tokens_why = "most tokens packed into one step (recipe build.max_num_tokens)"
    if num_tokens != b.max_num_tokens:
        tokens_why = (f"recipe build.max_num_tokens={b.max_num_tokens} adjusted to lie in "
                      f"[tokens_per_block, max_batch_size*max_seq_len], as trtllm-build would")
    return [
        FlagChoice("--max_batch_size", str(b.max_batch_size), "most requests in flight (recipe build.max_batch_size)"),
        FlagChoice("--max_input_len", str(b.max_input_len), "longest prompt (recipe build.max_input_len)"),
        FlagChoice("--max_seq_len", str(b.max_seq_len), "longest prompt + output (recipe build.max_seq_len)"),
        FlagChoice("--max_num_tokens", str(num_tokens), tokens_why),
        FlagChoice("--max_beam_width", str(b.max_beam_width), "beam search width (recipe build.max_beam_width)"),
    ]


def _kv_and_batching(recipe) -> list[FlagChoice]:
    s = recipe.serve
    wants = [n for n, on in (("chunked context", s.enable_chunked_context),
                             ("KV-cache reuse", s.enable_kv_cache_reuse)) if on]
    paged_ctx = (f"needed: the recipe turns on {' and '.join(wants)}" if wants else
                 "keeps chunked context and KV-cache reuse available at serve time without a rebuild")
    return [
        FlagChoice("--kv_cache_type", "paged", "paged KV cache: required by in-flight batching and KV reuse"),
        FlagChoice("--tokens_per_block", str(recipe.build.tokens_per_block),
                   "tokens per KV block (recipe build.tokens_per_block); the runtime uses the same block size"),
        FlagChoice("--remove_input_padding", "enable",
                   "pack tokens of all requests without padding: required by in-flight batching"),
        FlagChoice("--gpt_attention_plugin", "auto",
                   f"attention plugin in {recipe.model.dtype} (auto = checkpoint dtype): in-place paged KV "
                   "update, required by in-flight batching"),
        FlagChoice("--context_fmha", "enable", "fused multi-head attention kernel for the context (prefill) phase"),
        FlagChoice("--use_paged_context_fmha", "enable", paged_ctx),
    ]


def _gemm(recipe, gpu: GpuArch) -> list[FlagChoice]:
    weights = recipe.quantization.weights
    if weights == "fp8":
        gemm = FlagChoice("--gemm_plugin", "disable",
                          "FP8 GEMMs run faster as TensorRT kernels; NVIDIA advises the GEMM plugin off for FP8")
        fmha = FlagChoice("--use_fp8_context_fmha", "enable" if gpu.is_hopper else "disable",
                          "FP8 context FMHA, recommended with FP8 quantization" if gpu.is_hopper else
                          f"FP8 context FMHA is Hopper-only; target is {gpu.label}")
    else:
        why = ("cuBLASLt GEMM plugin for the remaining FP16/BF16 GEMMs (weight-only GEMMs use their own plugin)"
               if weights != "none" else
               f"cuBLASLt GEMM plugin: faster {recipe.model.dtype} GEMMs and less memory")
        gemm = FlagChoice("--gemm_plugin", "auto", why)
        fmha = FlagChoice("--use_fp8_context_fmha", "disable", "applies only to FP8-quantized weights")
    return [gemm, fmha]


def _mlp(recipe, plan) -> list[FlagChoice]:
    weights = recipe.quantization.weights
    if plan.spec.is_moe:
        return [
            FlagChoice("--use_fused_mlp", "disable",
                       "every MLP is an MoE layer; gated-MLP horizontal fusion has nothing to fuse"),
            FlagChoice("--moe_plugin", "auto",
                       f"fused MoE kernels ({plan.spec.num_experts} experts, top-{plan.spec.num_experts_per_tok}); "
                       "'disable' falls back to the slow out-of-the-box MoE"),
        ]
    if weights in ("none", "fp8"):
        fused = FlagChoice("--use_fused_mlp", "enable", "one GEMM for gate+up projections, then SwiGLU: lower latency")
    else:
        fused = FlagChoice("--use_fused_mlp", "disable",
                           f"trtllm-build turns gated-MLP fusion off for weight-only {weights}")
    return [fused, FlagChoice("--moe_plugin", None, "dense model: no MoE layers")]


def _profiles() -> list[FlagChoice]:
    return [FlagChoice("--multiple_profiles", "enable",
                       "several TensorRT optimization profiles, so small decode batches and large prefill "
                       "batches both get tuned kernels (costs build time)")]


def _collectives(recipe, plan, gpu: GpuArch) -> list[FlagChoice]:
    m = plan.mapping
    if m.world_size == 1:
        return [FlagChoice("--nccl_plugin", None, "single GPU: no collectives"),
                FlagChoice("--reduce_fusion", None, "single GPU: no all-reduce to fuse")]
    parts = [f"tp_size={m.tp_size} all-reduce" if m.tp_size > 1 else "",
             f"pp_size={m.pp_size} send/recv" if m.pp_size > 1 else ""]
    out = [FlagChoice("--nccl_plugin", "auto", f"NCCL collectives across {m.world_size} ranks: "
                      + ", ".join(p for p in parts if p))]
    if m.tp_size == 1:
        return out + [FlagChoice("--reduce_fusion", None, "tp_size=1: no all-reduce to fuse")]
    if m.pp_size > 1:
        return out + [FlagChoice("--reduce_fusion", "disable",
                                 f"pp_size={m.pp_size}: upstream fuses all-reduces only in TP-only examples, and "
                                 "the fusion has an accuracy history; kept to tp > 1 with pp_size 1")]
    # trtllm-build's build() overrides reduce_fusion to False for any other architecture.
    if gpu.is_hopper and plan.spec.architecture == "LlamaForCausalLM":
        out.append(FlagChoice("--reduce_fusion", "enable",
                              "fuse ResidualAdd+RMSNorm into the TP all-reduce (Hopper, LlamaForCausalLM)"))
        fp8 = recipe.quantization.weights == "fp8"
        out.append(FlagChoice("--user_buffer", "enable" if fp8 else "disable",
                              "zero-copy all-reduce buffers on top of reduce_fusion (FP8)" if fp8 else
                              "user buffers work only for FP8 models"))
    else:
        why = (f"Hopper-only fusion; target is {gpu.label}" if not gpu.is_hopper else
               f"trtllm-build supports reduce fusion for LlamaForCausalLM only, not {plan.spec.architecture}")
        out.append(FlagChoice("--reduce_fusion", "disable", why))
    return out


def choose_flags(recipe, plan, gpu: GpuArch, checkpoint_dir: str, output_dir: str) -> list[FlagChoice]:
    """Every trtllm-build decision for this recipe, in command-line order."""
    paths = [FlagChoice("--checkpoint_dir", str(checkpoint_dir), "converted unified checkpoint"),
             FlagChoice("--output_dir", str(output_dir), "engines: config.json + rank{N}.engine")]
    return (paths + _limits(recipe) + _kv_and_batching(recipe) + _gemm(recipe, gpu) + _mlp(recipe, plan)
            + _profiles() + _collectives(recipe, plan, gpu))


def build_argv(choices: list[FlagChoice], workers: int) -> list[str]:
    """`trtllm-build ...` with the emitted choices and `--workers` last."""
    argv = [TRTLLM_BUILD]
    for c in choices:
        if c.emitted:
            argv += [c.flag, c.value]
    return argv + ["--workers", str(workers)]


def build_options(choices: list[FlagChoice]) -> dict[str, str]:
    """The emitted choices that shape the engine (paths left out): part of the cache key."""
    return {c.flag.lstrip("-"): c.value for c in choices
            if c.emitted and c.flag not in ("--checkpoint_dir", "--output_dir")}


def shell_line(argv: list[str] | tuple[str, ...]) -> str:
    return shlex.join(argv)


@dataclass(frozen=True, slots=True)
class BuildCommand:
    """One trtllm-build invocation and the engine ranks it must produce."""

    argv: tuple[str, ...]
    ranks: tuple[int, ...]
    world_size: int
    node: int | None = None
    """The node these ranks live on (None: all ranks, built wherever the command runs)."""

    @property
    def all_ranks(self) -> bool:
        return self.ranks == tuple(range(self.world_size))


def node_ranks(plan) -> dict[int, tuple[int, ...]]:
    """Node -> global ranks placed on it (TensorRT-LLM order: rank // gpus_per_node)."""
    out: dict[int, list[int]] = {}
    for c in plan.mapping.ranks():
        out.setdefault(c.node, []).append(c.rank)
    return {n: tuple(r) for n, r in sorted(out.items())}


def parse_ranks(text: str | None, world_size: int) -> tuple[int, ...] | None:
    """`--ranks 2,3` or `--ranks 4-7` -> (2, 3) / (4, 5, 6, 7); None -> None (all ranks)."""
    if not text:
        return None
    ranks: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            ranks.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise BuildFlagError(f"--ranks {text!r}: expected a list like 0,1 or a range like 4-7") from None
    bad = sorted(r for r in ranks if not 0 <= r < world_size)
    if bad or not ranks:
        raise BuildFlagError(f"--ranks {text!r}: ranks must lie in 0..{world_size - 1} (world_size={world_size})")
    return tuple(sorted(ranks))


def build_command(choices: list[FlagChoice], plan, ranks: tuple[int, ...] | None = None,
                  workers: int | None = None) -> BuildCommand:
    """The command that builds `ranks` (default: all) with `--workers` = GPUs of one node used."""
    m = plan.mapping
    ranks = tuple(range(m.world_size)) if ranks is None else tuple(ranks)
    if workers is not None and workers < 1:
        raise BuildFlagError(f"--workers {workers}: must be >= 1")
    n = workers or min(m.gpus_per_node, len(ranks))
    nodes = {m.rank_coords(r).node for r in ranks}
    node = nodes.pop() if len(nodes) == 1 and len(ranks) < m.world_size else None
    return BuildCommand(argv=tuple(build_argv(choices, n)), ranks=ranks, world_size=m.world_size, node=node)


def per_node_commands(choices: list[FlagChoice], plan) -> list[BuildCommand]:
    """For multi-node layouts: what each node runs to build only its own ranks."""
    return [build_command(choices, plan, ranks) for ranks in node_ranks(plan).values()]
