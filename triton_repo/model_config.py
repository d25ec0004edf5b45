"""Typed builders of every model's `config.pbtxt`, as `tritonclient.grpc.model_config_pb2.ModelConfig`.

No text templates: each builder assembles the protobuf from `triton_repo.tensor_specs` and the resolved
`RepoOptions`, and `to_pbtxt` writes it with `google.protobuf.text_format`. Parameter values are given as a
dict; a key upstream's template does not have (or, for the reference runtime's tensorrt_llm, one of its own:
`tensor_specs.REFERENCE_PARAMETERS`) is refused, so a typo cannot pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from enginesmith.triton_repo import tensor_specs as ts

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "STRING", "BF16")


@dataclass(frozen=True, slots=True)
class RepoOptions:
    """The values the config.pbtxt files depend on (the repository writer resolves them from the recipe)."""

    triton_max_batch_size: int
    """max_batch_size of every model (the ensemble's must not exceed any step's, so all are equal)."""
    decoupled: bool
    """Decoupled transaction policy of tensorrt_llm and tensorrt_llm_bls: needed to stream tokens."""
    tensorrt_llm_backend: str = "tensorrtllm"
    """tensorrtllm (TensorRT-LLM's C++ backend) | python (our reference runtime)."""
    max_queue_delay_us: int = 0
    max_queue_size: int = 0
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1
    bls_instances: int = 1
    logits_datatype: str = "FP32"
    """Data type of context/generation/draft logits (upstream `logits_datatype`)."""
    prompt_table_datatype: str = "FP16"
    """Data type of prompt_embedding_table (upstream `prompt_embedding_table_data_type`)."""
    encoder_features_datatype: str = "FP16"
    """Data type of encoder_input_features (upstream `encoder_input_features_data_type`)."""

    def __post_init__(self) -> None:
        if self.triton_max_batch_size < 1:
            raise ValueError(f"triton_max_batch_size={self.triton_max_batch_size} must be >= 1")
        if self.tensorrt_llm_backend not in ("tensorrtllm", "python"):
            raise ValueError(f"tensorrt_llm_backend={self.tensorrt_llm_backend!r}: use tensorrtllm or python")
        for name in ("preprocessing_instances", "postprocessing_instances", "bls_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("logits_datatype", "prompt_table_datatype", "encoder_features_datatype"):
            if getattr(self, name) not in DATATYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {', '.join(DATATYPES)}")

    def dtype(self, name: str) -> str:
        """Resolve a tensor_specs data type (a per-repository variable or a plain name)."""
        return {ts.LOGITS: self.logits_datatype, ts.PROMPT_TABLE: self.prompt_table_datatype,
                ts.ENCODER_FEATURES: self.encoder_features_datatype}.get(name, name)


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _new(name: str, *, backend: str = "", platform: str = "", max_batch_size: int = 0) -> ModelConfig:
    cfg = _pb().ModelConfig(name=name, backend=backend, platform=platform, max_batch_size=max_batch_size)
    return cfg


def _add_tensors(cfg: ModelConfig, o: RepoOptions, inputs=(), outputs=()) -> None:
    pb = _pb()
    for spec in inputs:
        inp = cfg.input.add(name=spec.name, data_type=pb.DataType.Value(f"TYPE_{o.dtype(spec.dtype)}"),
                            dims=spec.dims, optional=spec.optional, allow_ragged_batch=spec.ragged)
        if spec.reshape:
            inp.reshape.SetInParent()
    for spec in outputs:
        cfg.output.add(name=spec.name, data_type=pb.DataType.Value(f"TYPE_{o.dtype(spec.dtype)}"), dims=spec.dims)


def _set_parameters(cfg: ModelConfig, params: dict[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"model {cfg.name}: unknown parameters {unknown}; upstream's keys are {list(allowed)}")
    for key in allowed:
        if key in params:
            value = params[key]
            if not isinstance(value, str):
                raise ValueError(f"model {cfg.name}: parameter {key} must be a string, got {value!r}")
            cfg.parameters[key].string_value = value


def _cpu_instances(cfg: ModelConfig, count: int) -> None:
    cfg.instance_group.add(count=count, kind=_pb().ModelInstanceGroup.KIND_CPU)


def _dynamic_batching(cfg: ModelConfig, o: RepoOptions) -> None:
    db = cfg.dynamic_batching
    db.preferred_batch_size.append(o.triton_max_batch_size)
    db.max_queue_delay_microseconds = o.max_queue_delay_us
    db.default_queue_policy.max_queue_size = o.max_queue_size
    db.default_queue_policy.SetInParent()


def tensorrt_llm_config(o: RepoOptions, params: dict[str, str]) -> ModelConfig:
    """The core model: TensorRT-LLM's C++ backend, or our reference runtime under the Python backend."""
    cfg = _new("tensorrt_llm", backend=o.tensorrt_llm_backend, max_batch_size=o.triton_max_batch_size)
    cfg.model_transaction_policy.decoupled = o.decoupled
    cfg.model_transaction_policy.SetInParent()
    _dynamic_batching(cfg, o)
    _add_tensors(cfg, o, ts.TENSORRT_LLM_INPUTS, ts.TENSORRT_LLM_OUTPUTS)
    _cpu_instances(cfg, 1)
    own = ts.REFERENCE_PARAMETERS if o.tensorrt_llm_backend == "python" else ()
    _set_parameters(cfg, params, ts.TENSORRT_LLM_PARAMETERS + own)
    return cfg


def preprocessing_config(o: RepoOptions, params: dict[str, str]) -> ModelConfig:
    """Tokenizer model: text, stop/bad words and ids -> token tensors."""
    cfg = _new("preprocessing", backend="python", max_batch_size=o.triton_max_batch_size)
    _dynamic_batching(cfg, o)
    _add_tensors(cfg, o, ts.PREPROCESSING_INPUTS, ts.PREPROCESSING_OUTPUTS)
    _set_parameters(cfg, params, ts.PREPROCESSING_PARAMETERS)
    _cpu_instances(cfg, o.preprocessing_instances)
    return cfg


def postprocessing_config(o: RepoOptions, params: dict[str, str]) -> ModelConfig:
    """Detokenizer model: token ids -> text (incremental per request id when streaming)."""
    cfg = _new("postprocessing", backend="python", max_batch_size=o.triton_max_batch_size)
    cfg.dynamic_batching.SetInParent()
    _add_tensors(cfg, o, ts.POSTPROCESSING_INPUTS, ts.POSTPROCESSING_OUTPUTS)
    _set_parameters(cfg, params, ts.POSTPROCESSING_PARAMETERS)
    _cpu_instances(cfg, o.postprocessing_instances)
    return cfg


def bls_config(o: RepoOptions, params: dict[str, str]) -> ModelConfig:
    """tensorrt_llm_bls: the ensemble's pipeline written as Python BLS calls."""
    cfg = _new("tensorrt_llm_bls", backend="python", max_batch_size=o.triton_max_batch_size)
    cfg.model_transaction_policy.decoupled = o.decoupled
    cfg.model_transaction_policy.SetInParent()
    _add_tensors(cfg, o, ts.BLS_INPUTS, ts.TEXT_OUTPUTS)
    _set_parameters(cfg, params, ts.BLS_PARAMETERS)
    _cpu_instances(cfg, o.bls_instances)
    return cfg


# Ensemble wiring: (step tensor, ensemble tensor). Underscored names are internal to the ensemble.
PREPROCESSING_IN = (("QUERY", "text_input"), ("DECODER_QUERY", "decoder_text_input"),
                    ("REQUEST_OUTPUT_LEN", "max_tokens"), ("BAD_WORDS_DICT", "bad_words"),
                    ("STOP_WORDS_DICT", "stop_words"), ("EMBEDDING_BIAS_WORDS", "embedding_bias_words"),
                    ("EMBEDDING_BIAS_WEIGHTS", "embedding_bias_weights"), ("END_ID", "end_id"),
                    ("PAD_ID", "pad_id"), ("PROMPT_TABLE_EXTRA_ID", "prompt_table_extra_id"))
PREPROCESSING_OUT = (("REQUEST_INPUT_LEN", "_REQUEST_INPUT_LEN"), ("INPUT_ID", "_INPUT_ID"),
                     ("REQUEST_DECODER_INPUT_LEN", "_REQUEST_DECODER_INPUT_LEN"),
                     ("DECODER_INPUT_ID", "_DECODER_INPUT_ID"), ("REQUEST_OUTPUT_LEN", "_REQUEST_OUTPUT_LEN"),
                     ("STOP_WORDS_IDS", "_STOP_WORDS_IDS"), ("BAD_WORDS_IDS", "_BAD_WORDS_IDS"),
                     ("EMBEDDING_BIAS", "_EMBEDDING_BIAS"), ("OUT_END_ID", "_PREPROCESSOR_END_ID"),
                     ("OUT_PAD_ID", "_PREPROCESSOR_PAD_ID"),
                     ("OUT_PROMPT_TABLE_EXTRA_IDS", "_OUT_PROMPT_TABLE_EXTRA_IDS"))
TENSORRT_LLM_IN = (
    ("input_ids", "_INPUT_ID"), ("decoder_input_ids", "_DECODER_INPUT_ID"),
    ("input_lengths", "_REQUEST_INPUT_LEN"), ("decoder_input_lengths", "_REQUEST_DECODER_INPUT_LEN"),
    ("exclude_input_in_output", "exclude_input_in_output"), ("request_output_len", "_REQUEST_OUTPUT_LEN"),
    ("end_id", "_PREPROCESSOR_END_ID"), ("pad_id", "_PREPROCESSOR_PAD_ID"), ("embedding_bias", "_EMBEDDING_BIAS"),
    ("runtime_top_k", "top_k"), ("runtime_top_p", "top_p"), ("len_penalty", "length_penalty"),
    ("streaming", "stream"), ("stop_words_list", "_STOP_WORDS_IDS"), ("bad_words_list", "_BAD_WORDS_IDS"),
    ("prompt_table_extra_ids", "_OUT_PROMPT_TABLE_EXTRA_IDS"),
    *((n, n) for n in ("temperature", "early_stopping", "prompt_ignore_length", "repetition_penalty",
                       "min_tokens", "presence_penalty", "frequency_penalty", "seed", "return_log_probs",
                       "return_context_logits", "return_generation_logits", "return_perf_metrics",
                       "return_num_input_tokens", "return_num_output_tokens", "num_return_sequences",
                       "beam_width", "prompt_embedding_table", "prompt_vocab_size", "lora_task_id",
                       "lora_weights", "lora_config", "guided_decoding_guide_type", "guided_decoding_guide")),
)
TENSORRT_LLM_OUT = (("output_ids", "_TOKENS_BATCH"), ("sequence_length", "_SEQUENCE_LENGTH"),
                    *((s.name, s.name) for s in ts.PASSTHROUGH_OUTPUTS))
POSTPROCESSING_IN = (("TOKENS_BATCH", "_TOKENS_BATCH"), ("SEQUENCE_LENGTH", "_SEQUENCE_LENGTH"))
POSTPROCESSING_OUT = (("OUTPUT", "text_output"),)

ENSEMBLE_STEPS = (("preprocessing", PREPROCESSING_IN, PREPROCESSING_OUT),
                  ("tensorrt_llm", TENSORRT_LLM_IN, TENSORRT_LLM_OUT),
                  ("postprocessing", POSTPROCESSING_IN, POSTPROCESSING_OUT))


def ensemble_config(o: RepoOptions) -> ModelConfig:
    """preprocessing -> tensorrt_llm -> postprocessing; Triton makes it decoupled when tensorrt_llm is."""
    cfg = _new("ensemble", platform="ensemble", max_batch_size=o.triton_max_batch_size)
    _add_tensors(cfg, o, ts.ENSEMBLE_INPUTS, ts.TEXT_OUTPUTS)
    for model, inputs, outputs in ENSEMBLE_STEPS:
        step = cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        step.input_map.update(dict(inputs))
        step.output_map.update(dict(outputs))
    return cfg


def llmapi_config(o: RepoOptions) -> ModelConfig:
    """The single `tensorrt_llm` Python model over TensorRT-LLM's LLM API (target trtllm-llmapi).

    Upstream leaves max_batch_size and the transaction policy to model.yaml's `triton_config` through
    auto-complete; we write both here too, because launches pass --disable-auto-complete-config.
    """
    cfg = _new("tensorrt_llm", backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = o.decoupled
    cfg.model_transaction_policy.SetInParent()
    _cpu_instances(cfg, 1)
    _add_tensors(cfg, o, ts.LLMAPI_INPUTS, ts.LLMAPI_OUTPUTS)
    return cfg


def to_pbtxt(cfg: ModelConfig) -> str:
    """The config.pbtxt text of `cfg`."""
    from google.protobuf import text_format

    header = "# Generated by enginesmith (triton_repo/model_config.py); regenerate instead of editing.\n"
    return header + text_format.MessageToString(cfg)


def parse_pbtxt(text: str) -> ModelConfig:
    """Parse config.pbtxt text (ours or upstream's filled templates) into a ModelConfig."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())
