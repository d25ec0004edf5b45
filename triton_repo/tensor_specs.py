"""Upstream's tensor contracts, model by model, as data (TensorRT-LLM `triton_backend/all_models`, May 2026).

Names, data types, dims and the optional / reshape / ragged flags are copied from upstream's config.pbtxt
templates, in their order; `tests/test_model_config.py` fills those templates and checks we match them.
Three data types are chosen per repository (upstream template variables): LOGITS (`logits_datatype`),
PROMPT_TABLE (`prompt_embedding_table_data_type`) and ENCODER_FEATURES (`encoder_input_features_data_type`).
"""

from __future__ import annotations

from dataclasses import dataclass

LOGITS = "$logits"
PROMPT_TABLE = "$prompt_table"
ENCODER_FEATURES = "$encoder_features"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One `input` or `output` entry of a config.pbtxt."""

    name: str
    dtype: str
    """TYPE_* name without the prefix (INT32, FP32, STRING...), or one of the per-repository variables."""
    dims: tuple[int, ...]
    optional: bool = False
    reshape: bool = False
    """`reshape: { shape: [ ] }`: a [1] tensor the backend sees as a scalar."""
    ragged: bool = False
    """`allow_ragged_batch: true`."""


def t(name: str, dtype: str, *dims: int, opt: bool = True, rs: bool = False, rag: bool = False) -> TensorSpec:
    return TensorSpec(name, dtype, dims, optional=opt, reshape=rs, ragged=rag)


def out(name: str, dtype: str, *dims: int) -> TensorSpec:
    return TensorSpec(name, dtype, dims)


def _scalars(dtype: str, *names: str, rs: bool = True, rag: bool = False) -> list[TensorSpec]:
    return [t(n, dtype, 1, rs=rs, rag=rag) for n in names]


# ---- tensorrt_llm (the engine, or our reference runtime) ---------------------------------------------
TENSORRT_LLM_INPUTS: tuple[TensorSpec, ...] = (
    t("input_ids", "INT32", -1, rag=True),
    t("encoder_input_features", ENCODER_FEATURES, -1, -1, rag=True),
    t("encoder_output_lengths", "INT32", 1, rs=True),
    t("input_lengths", "INT32", 1, opt=False, rs=True),
    t("request_output_len", "INT32", 1, opt=False, rs=True),
    t("num_return_sequences", "INT32", 1, rs=True),
    t("draft_input_ids", "INT32", -1, rag=True),
    t("decoder_input_ids", "INT32", -1, rag=True),
    t("decoder_input_lengths", "INT32", 1, rs=True),
    t("draft_logits", LOGITS, -1, -1, rag=True),
    t("draft_acceptance_threshold", "FP32", 1, rs=True),
    *_scalars("INT32", "end_id", "pad_id"),
    t("stop_words_list", "INT32", 2, -1, rag=True),
    t("bad_words_list", "INT32", 2, -1, rag=True),
    t("embedding_bias", "FP32", -1, rag=True),
    *_scalars("INT32", "beam_width"),
    *_scalars("FP32", "temperature"),
    *_scalars("INT32", "runtime_top_k"),
    *_scalars("FP32", "runtime_top_p", "runtime_top_p_min", "runtime_top_p_decay"),
    *_scalars("INT32", "runtime_top_p_reset_ids"),
    *_scalars("FP32", "len_penalty"),
    *_scalars("INT32", "prompt_ignore_length", "early_stopping"),
    *_scalars("FP32", "repetition_penalty"),
    *_scalars("INT32", "min_tokens"),
    *_scalars("FP32", "beam_search_diversity_rate", "presence_penalty", "frequency_penalty"),
    *_scalars("UINT64", "seed"),
    *_scalars("BOOL", "return_log_probs", "return_context_logits", "return_generation_logits",
              "return_perf_metrics", "return_num_input_tokens", "return_num_output_tokens",
              "exclude_input_in_output", "stop", "streaming"),
    t("prompt_embedding_table", PROMPT_TABLE, -1, -1, rag=True),
    t("prompt_table_extra_ids", "UINT64", -1, rag=True),
    t("prompt_vocab_size", "INT32", 1, rs=True),
    t("cross_attention_mask", "BOOL", -1, -1, rag=True),
    t("mrope_rotary_cos_sin", "FP32", -1),
    t("mrope_position_deltas", "INT64", 1),
    t("lora_task_id", "UINT64", 1, rs=True),
    t("lora_weights", "FP16", -1, -1, rag=True),
    t("lora_config", "INT32", -1, 3, rag=True),
    t("context_phase_params", "UINT8", -1, rag=True),
    t("skip_cross_attn_blocks", "BOOL", 1, rag=True),
    *[t(f"retention_token_range_{n}", "INT32", -1, rag=True) for n in ("starts", "ends", "priorities", "durations_ms")],
    *_scalars("INT32", "retention_decode_priority", "retention_decode_duration_ms", rs=False, rag=True),
    *_scalars("STRING", "guided_decoding_guide_type", "guided_decoding_guide", rs=False, rag=True),
    *_scalars("INT32", "lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size",
              rs=False, rag=True),
)

# Outputs the ensemble and the BLS pass through unchanged from tensorrt_llm (same name both sides).
PASSTHROUGH_OUTPUTS: tuple[TensorSpec, ...] = (
    out("cum_log_probs", "FP32", -1),
    out("output_log_probs", "FP32", -1, -1),
    out("context_logits", LOGITS, -1, -1),
    out("generation_logits", LOGITS, -1, -1, -1),
    out("batch_index", "INT32", 1),
    out("sequence_index", "INT32", 1),
    *[out(f"kv_cache_{n}", "INT32", 1) for n in ("alloc_new_blocks", "reused_blocks", "alloc_total_blocks")],
    *[out(f"{n}_time_ns", "INT64", 1) for n in ("arrival", "first_scheduled", "first_token", "last_token")],
    out("acceptance_rate", "FP32", 1),
    out("total_accepted_draft_tokens", "INT32", 1),
    out("total_draft_tokens", "INT32", 1),
    out("num_input_tokens", "INT32", 1),
    out("num_output_tokens", "INT32", 1),
)

TENSORRT_LLM_OUTPUTS: tuple[TensorSpec, ...] = (
    out("output_ids", "INT32", -1, -1),
    out("sequence_length", "INT32", -1),
    *PASSTHROUGH_OUTPUTS[:6],
    out("context_phase_params", "UINT8", -1),
    *PASSTHROUGH_OUTPUTS[6:],
)

# Every `parameters` key of upstream's tensorrt_llm template (values are filled by triton_repo.repository).
TENSORRT_LLM_PARAMETERS: tuple[str, ...] = (
    "max_beam_width", "FORCE_CPU_ONLY_INPUT_TENSORS", "gpt_model_type", "gpt_model_path", "encoder_model_path",
    "max_tokens_in_paged_kv_cache", "max_attention_window_size", "sink_token_length", "batch_scheduler_policy",
    "kv_cache_free_gpu_mem_fraction", "cross_kv_cache_fraction", "kv_cache_host_memory_bytes",
    "enable_trt_overlap", "exclude_input_in_output", "cancellation_check_period_ms", "stats_check_period_ms",
    "iter_stats_max_iterations", "request_stats_max_iterations", "enable_kv_cache_reuse", "normalize_log_probs",
    "enable_chunked_context", "gpu_device_ids", "participant_ids", "num_nodes",
    "lora_cache_optimal_adapter_size", "lora_cache_max_adapter_size", "lora_cache_gpu_memory_fraction",
    "lora_cache_host_memory_bytes", "lora_prefetch_dir", "decoding_mode", "executor_worker_path",
    "lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size", "medusa_choices",
    "eagle_choices", "gpu_weights_percent", "enable_context_fmha_fp32_acc", "multi_block_mode",
    "cuda_graph_mode", "cuda_graph_cache_size", "speculative_decoding_fast_logits", "tokenizer_dir",
    "guided_decoding_backend", "xgrammar_tokenizer_info_path",
)
# Keys of our own that the reference runtime's tensorrt_llm model (backend python) also reads.
REFERENCE_PARAMETERS: tuple[str, ...] = ("engine_process", "iteration_log_path", "stream_interval")

# ---- preprocessing / postprocessing --------------------------------------------------------------------
PREPROCESSING_INPUTS: tuple[TensorSpec, ...] = (
    t("QUERY", "STRING", 1, opt=False),
    t("DECODER_QUERY", "STRING", 1),
    t("IMAGE_BYTES", "UINT8", -1, -1, -1, -1),
    t("IMAGE_URL", "STRING", -1),
    t("IMAGE_SIZES", "INT64", -1, 2),
    t("VIDEO_BYTES", "UINT8", -1, -1, -1, -1),
    t("REQUEST_OUTPUT_LEN", "INT32", 1, opt=False),
    t("BAD_WORDS_DICT", "STRING", -1),
    t("STOP_WORDS_DICT", "STRING", -1),
    t("EMBEDDING_BIAS_WORDS", "STRING", -1),
    t("EMBEDDING_BIAS_WEIGHTS", "FP32", -1),
    *_scalars("INT32", "END_ID", "PAD_ID", rs=False),
    t("PROMPT_TABLE_EXTRA_ID", "UINT64", 1),
)

PREPROCESSING_OUTPUTS: tuple[TensorSpec, ...] = (
    out("INPUT_ID", "INT32", -1),
    out("REQUEST_INPUT_LEN", "INT32", 1),
    out("DECODER_INPUT_ID", "INT32", -1),
    out("REQUEST_DECODER_INPUT_LEN", "INT32", 1),
    out("BAD_WORDS_IDS", "INT32", 2, -1),
    out("STOP_WORDS_IDS", "INT32", 2, -1),
    out("EMBEDDING_BIAS", "FP32", -1),
    out("REQUEST_OUTPUT_LEN", "INT32", -1),
    out("OUT_END_ID", "INT32", 1),
    out("OUT_PAD_ID", "INT32", 1),
    out("OUT_PROMPT_TABLE_EXTRA_IDS", "UINT64", -1),
    out("PIXEL_VALUES", "FP16", -1, -1, -1, -1),
    out("ASPECT_RATIO_IDS", "INT64", -1),
    out("ASPECT_RATIO_MASK", "INT64", -1, -1),
    out("CROSS_ATTENTION_MASK", "INT64", -1, -1, -1),
    out("IMAGE_SIZES", "INT64", -1, 2),
    out("IS_VIDEO_INPUT", "BOOL", 1),
    out("ATTENTION_MASK", "INT64", -1),
    out("IMAGE_GRID_THW", "INT64", 3),
    out("VISION_INPUT_ID", "INT32", -1),
)

PREPROCESSING_PARAMETERS = ("tokenizer_dir", "add_special_tokens", "multimodal_model_path", "gpt_model_path",
                            "max_num_images")

POSTPROCESSING_INPUTS = (t("TOKENS_BATCH", "INT32", -1, -1, opt=False), t("SEQUENCE_LENGTH", "INT32", -1, opt=False))
POSTPROCESSING_OUTPUTS = (out("OUTPUT", "STRING", -1),)
POSTPROCESSING_PARAMETERS = ("tokenizer_dir", "skip_special_tokens")

# ---- ensemble and BLS: the text-level API -------------------------------------------------------------
_SAMPLING = (
    *_scalars("INT32", "end_id", "pad_id", "top_k", rs=False),
    *_scalars("FP32", "top_p", "temperature", "length_penalty", rs=False),
)
_PENALTIES = (
    *_scalars("FP32", "repetition_penalty", rs=False),
    *_scalars("INT32", "min_tokens", rs=False),
    *_scalars("FP32", "presence_penalty", "frequency_penalty", rs=False),
    *_scalars("UINT64", "seed", rs=False),
)
_WORDS = (t("bad_words", "STRING", -1), t("stop_words", "STRING", -1), t("exclude_input_in_output", "BOOL", 1))
_BIAS = (t("embedding_bias_words", "STRING", -1), t("embedding_bias_weights", "FP32", -1))
_LORA = (t("lora_weights", "FP16", -1, -1, rag=True), t("lora_config", "INT32", -1, 3, rag=True))

ENSEMBLE_INPUTS: tuple[TensorSpec, ...] = (
    t("text_input", "STRING", 1, opt=False),
    t("decoder_text_input", "STRING", 1),
    t("max_tokens", "INT32", 1, opt=False),
    t("num_return_sequences", "INT32", 1),
    *_WORDS,
    *_SAMPLING,
    *_scalars("INT32", "early_stopping", "prompt_ignore_length", rs=False),
    *_PENALTIES,
    *_scalars("BOOL", "return_log_probs", "return_context_logits", "return_generation_logits",
              "return_perf_metrics", "return_num_input_tokens", "return_num_output_tokens", rs=False),
    t("beam_width", "INT32", 1),
    t("stream", "BOOL", 1),
    t("prompt_embedding_table", "FP16", -1, -1),
    t("prompt_table_extra_id", "UINT64", 1),
    t("prompt_vocab_size", "INT32", 1),
    *_BIAS,
    t("lora_task_id", "UINT64", 1),
    *_LORA,
    *_scalars("STRING", "guided_decoding_guide_type", "guided_decoding_guide", rs=False, rag=True),
)

TEXT_OUTPUTS: tuple[TensorSpec, ...] = (out("text_output", "STRING", -1), *PASSTHROUGH_OUTPUTS)

BLS_INPUTS: tuple[TensorSpec, ...] = (
    t("text_input", "STRING", 1, opt=False),
    t("decoder_text_input", "STRING", 1),
    t("image_input", "FP16", -1, 3, -1, -1),
    t("image_bytes_input", "UINT8", -1, -1, -1, -1),
    t("image_url_input", "STRING", 1),
    t("image_sizes_input", "INT64", -1, 2),
    t("video_bytes_input", "UINT8", -1, -1, -1, -1),
    t("max_tokens", "INT32", 1, opt=False),
    *_WORDS,
    *_SAMPLING,
    t("prompt_ignore_length", "INT32", 1),
    *_PENALTIES,
    *_scalars("BOOL", "return_log_probs", "return_context_logits", "return_generation_logits"),
    *_scalars("INT32", "num_return_sequences"),
    t("beam_width", "INT32", 1),
    t("stream", "BOOL", 1),
    t("prompt_embedding_table", PROMPT_TABLE, -1, -1),
    t("prompt_vocab_size", "INT32", 1),
    t("prompt_table_extra_id", "UINT64", 1),
    *_BIAS,
    t("num_draft_tokens", "INT32", 1),
    t("use_draft_logits", "BOOL", 1, rs=True),
    t("lora_task_id", "UINT64", 1, rs=True),
    *_LORA,
    *_scalars("BOOL", "return_perf_metrics", "return_num_input_tokens", "return_num_output_tokens"),
    *_scalars("STRING", "guided_decoding_guide_type", "guided_decoding_guide", rs=False),
)

BLS_PARAMETERS = ("accumulate_tokens", "tensorrt_llm_model_name", "tensorrt_llm_draft_model_name",
                  "multimodal_encoders_name")

# ---- llmapi: one Python model over TensorRT-LLM's LLM API ------------------------------------------------
LLMAPI_INPUTS: tuple[TensorSpec, ...] = (
    t("text_input", "STRING", -1, opt=False),
    t("streaming", "BOOL", 1),
    t("sampling_param_best_of", "INT32", 1),
    t("sampling_param_temperature", "FP32", 1),
    t("sampling_param_top_k", "INT32", 1),
    t("sampling_param_top_p", "FP32", 1),
    t("sampling_param_frequency_penalty", "FP32", 1),
    t("sampling_param_presence_penalty", "FP32", 1),
    t("sampling_param_max_tokens", "INT32", 1),
    t("sampling_param_stop", "STRING", -1),
    t("sampling_param_seed", "UINT64", 1),
    t("sampling_param_exclude_input_from_output", "BOOL", 1),
    t("sampling_param_return_perf_metrics", "BOOL", 1),
    t("return_finish_reason", "BOOL", 1),
    t("return_stop_reason", "BOOL", 1),
    t("return_cumulative_logprob", "BOOL", 1),
    t("stop", "BOOL", 1),
)

LLMAPI_OUTPUTS: tuple[TensorSpec, ...] = (
    out("text_output", "STRING", -1),
    out("finish_reason", "STRING", -1),
    out("stop_reason", "STRING", -1),
    out("cumulative_logprob", "FP32", -1),
    *[out(n, "INT32", -1) for n in ("kv_cache_reused_block", "kv_cache_missed_block", "kv_cache_alloc_new_blocks",
                                    "kv_cache_alloc_total_blocks")],
    out("kv_cache_hit_rate", "FP32", -1),
    *PASSTHROUGH_OUTPUTS[9:16],
)
