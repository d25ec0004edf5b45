"""Checks that run before anything is written: layout vs model, options, and the files vs config.json."""

from __future__ import annotations

from enginesmith.builders.convert.errors import ConvertError
from enginesmith.builders.convert.rank_plan import referenced_sources
from enginesmith.builders.convert.source import FLOAT_DTYPES, HFSource, expected_size
from enginesmith.builders.convert.weight_map import IGNORED_SUFFIXES
from enginesmith.builders.mapping import Mapping
from enginesmith.builders.model_spec import SUPPORTED_ARCHITECTURES, ModelSpec

DTYPES = ("float32", "float16", "bfloat16")
MAX_LISTED = 8


def check_layout(spec: ModelSpec, mapping: Mapping) -> None:
    """The mapping is one TensorRT-LLM can build for this model (same rules as its layers assert)."""
    tp, nh, nkv = mapping.tp_size, spec.num_attention_heads, spec.num_key_value_heads
    rules = [
        (nh % tp == 0, f"tp_size={tp} must divide num_attention_heads={nh}"),
        (tp % nkv == 0 or nkv % tp == 0,
         f"tp_size={tp} and num_key_value_heads={nkv}: one must divide the other (KV heads are split or duplicated)"),
        (mapping.pp_size <= spec.num_hidden_layers,
         f"pp_size={mapping.pp_size} exceeds num_hidden_layers={spec.num_hidden_layers}"),
    ]
    if spec.is_moe:
        rules += [
            (spec.num_experts % mapping.moe_ep_size == 0,
             f"moe_ep_size={mapping.moe_ep_size} must divide num_local_experts={spec.num_experts}"),
            (spec.moe_intermediate_size % mapping.moe_tp_size == 0,
             f"moe_tp_size={mapping.moe_tp_size} must divide the expert "
             f"intermediate_size={spec.moe_intermediate_size}"),
        ]
    else:
        rules += [
            (spec.intermediate_size % tp == 0, f"tp_size={tp} must divide intermediate_size={spec.intermediate_size}"),
            (mapping.moe_ep_size == 1,
             f"moe_ep_size={mapping.moe_ep_size} needs a MoE model; {spec.architecture} is dense (use 1)"),
        ]
    bad = [msg for ok, msg in rules if not ok]
    if bad:
        raise ConvertError(f"parallel layout does not fit {spec.name or spec.architecture}: " + "; ".join(bad))


def check_options(dtype: str, quant_algo: str | None, spec: ModelSpec) -> None:
    if spec.architecture not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"architecture {spec.architecture} is not supported; supported: "
                           + ", ".join(sorted(SUPPORTED_ARCHITECTURES)))
    if dtype not in DTYPES:
        raise ConvertError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if quant_algo == "W4A16":
        odd = [n for n, v in (("intermediate_size", spec.intermediate_size), ("hidden_size", spec.hidden_size))
               if v % 2]
        if odd:
            raise ConvertError(f"int4_weight_only packs output columns in pairs; {odd[0]} is odd")


def check_source(source: HFSource, spec: ModelSpec) -> None:
    """Every tensor the weight map needs exists with the shape config.json implies and a float dtype,
    and no weight is left over (an unknown variant would otherwise convert silently wrong)."""
    expected = referenced_sources(spec)
    problems = []
    for shard in sorted(set(source.files.values())):
        if not shard.is_file():
            raise ConvertError(f"{shard.name} is listed in {source.root}/model.safetensors.index.json but missing; "
                               "download the checkpoint again")
        if shard.stat().st_size < expected_size(shard):
            problems.append(f"{shard.name} is truncated: {shard.stat().st_size} bytes, its header promises "
                            f"{expected_size(shard)} (interrupted download?)")
    for name, shape in expected.items():
        if name not in source:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
            continue
        dtype, actual = source.info(name)
        if actual != shape:
            problems.append(f"{name} has shape {list(actual)}, expected {list(shape)} from config.json")
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{name} has dtype {dtype}, expected one of F32/F16/BF16 "
                            "(already-quantized checkpoints are not supported)")
    ignored = IGNORED_SUFFIXES + (("lm_head.weight",) if spec.tie_word_embeddings else ())
    unused = sorted(n for n in source.files if n not in expected and not n.endswith(ignored))
    if unused:
        problems.append(f"tensor {unused[0]} is not used by the {spec.family} weight map "
                        f"({len(unused)} such tensors): this checkpoint variant is not supported")
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ConvertError(f"checkpoint {source.root} does not match its config.json:\n  - "
                           + "\n  - ".join(problems[:MAX_LISTED]) + more)
