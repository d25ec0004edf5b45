"""The build, serve and SLA sections of a recipe (see builders/recipe.py for the rest)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator

from enginesmith.builders.recipe_errors import rule


class Section(BaseModel):
    """Base of every recipe section: frozen, unknown keys rejected, attribute docstrings as descriptions."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class BuildSection(Section):
    """Engine limits (TensorRT-LLM's build config) and which build target to produce."""

    target: Literal["trtllm-engine", "trtllm-llmapi", "reference"] = "reference"
    """trtllm-engine (trtllm-build engines) | trtllm-llmapi (LLM-API YAML) | reference (enginesmith's PyTorch
    runtime; runs on CPU)."""
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    """Most sequences in flight at once."""
    max_input_len: int = Field(default=1024, ge=1)
    """Longest prompt in tokens."""
    max_seq_len: int = Field(default=2048, ge=2)
    """Longest prompt + generated tokens of one sequence."""
    max_num_tokens: int = Field(default=8192, ge=1)
    """Most tokens (prompt chunks + one per generating sequence) processed in one engine step."""
    max_beam_width: int = Field(default=1, ge=1, le=16)
    """Beam search width (1 = greedy/sampling)."""
    tokens_per_block: int = Field(default=32, ge=1, le=1024)
    """Tokens per paged KV-cache block; a power of two."""

    @field_validator("tokens_per_block")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"{v} is not a power of two; use {1 << (v.bit_length() - 1)} or {1 << v.bit_length()}")
        return v

    @model_validator(mode="after")
    def _limits(self) -> BuildSection:
        if self.max_input_len > self.max_seq_len:
            raise rule("max_input_len", f"{self.max_input_len} exceeds max_seq_len={self.max_seq_len}; "
                                        "lower it or raise max_seq_len")
        if self.max_num_tokens < self.max_batch_size * self.max_beam_width:
            raise rule("max_num_tokens", f"{self.max_num_tokens} < max_batch_size*max_beam_width="
                                         f"{self.max_batch_size * self.max_beam_width}: every generating beam "
                                         "needs a token slot per step; raise it")
        return self


class ServeSection(Section):
    """How tritonserver runs the model (tensorrt_llm backend parameters and ports)."""

    batching_strategy: Literal["inflight_fused_batching"] = "inflight_fused_batching"
    """Triton TensorRT-LLM backend batching (in-flight batching is the only supported mode)."""
    kv_cache_free_gpu_mem_fraction: float = Field(default=0.9, gt=0.0, le=1.0)
    """Fraction of the GPU memory left after weights and activations that the KV cache takes."""
    enable_chunked_context: bool = False
    """Split long prompts into chunks of at most max_num_tokens so they interleave with generation."""
    enable_kv_cache_reuse: bool = False
    """Reuse KV blocks of shared prompt prefixes across requests."""
    stream_interval: int = Field(default=1, ge=1)
    """Reference runtime: a streamed response carries the tokens of up to this many steps (the first token and the
    end still go out at once). 1 streams every token; larger values cut the per-response work of the server and
    its clients at high concurrency (TensorRT-LLM's LLM API has the same knob). The tensorrtllm backend streams
    every token."""
    batch_scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] = "guaranteed_no_evict"
    """guaranteed_no_evict (admit only if the whole sequence fits) | max_utilization (pack, may pause)."""
    decoupled: bool = True
    """Decoupled transaction policy: required to stream tokens as they are generated."""
    max_queue_delay_us: int = Field(default=0, ge=0)
    """Dynamic-batcher delay before a request is scheduled, in microseconds."""
    max_queue_size: int = Field(default=0, ge=0)
    """Requests queued before new ones are rejected (0 = unbounded)."""
    triton_max_batch_size: int = Field(default=64, ge=1)
    """max_batch_size of the Triton models (requests per Triton batch)."""
    preprocessing_instances: int = Field(default=1, ge=1)
    """Instances of the tokenizer model."""
    postprocessing_instances: int = Field(default=1, ge=1)
    """Instances of the detokenizer model."""
    bls_instances: int | None = Field(default=None, ge=1)
    """Instances of the tensorrt_llm_bls model. Each handles one request at a time, so the default is
    triton_max_batch_size (upstream's advice: the engine's batch); each instance is one stub process."""
    http_port: int = Field(default=8000, ge=1, le=65535)
    """HTTP/REST port."""
    grpc_port: int = Field(default=8001, ge=1, le=65535)
    """gRPC port."""
    metrics_port: int = Field(default=8002, ge=1, le=65535)
    """Prometheus metrics port."""
    bind_address: str = "127.0.0.1"
    """Address the server listens on (an IP address or localhost); 0.0.0.0 exposes it to the network."""
    engine_process: bool | None = None
    """Target reference: run the engine in a process of its own, whose loop shares no GIL with the Triton stub's
    response and metrics threads; unset: where the engine gets a GPU (ENGINESMITH_ENGINE_PROCESS, when set,
    overrides it)."""

    @field_validator("bind_address")
    @classmethod
    def _address(cls, v: str) -> str:
        if v != "localhost":
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address; use e.g. 127.0.0.1 or 0.0.0.0") from None
        return v

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServeSection:
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise rule(name, f"{port} is already serve.{seen[port]}; give each endpoint its own port")
            seen[port] = name
        return self


class SlaSection(Section):
    """What the deployment must achieve; the plan's verdict is checked against it."""

    ttft_ms: PositiveFloat | None = 1000.0
    """Time to first token target, ms."""
    tpot_ms: PositiveFloat | None = 100.0
    """Time per output token (inter-token latency) target, ms."""
    e2e_ms: PositiveFloat | None = None
    """End-to-end request latency target, ms."""
    request_rate: PositiveFloat | None = None
    """Offered load in requests/s (open loop); give this or concurrency."""
    concurrency: int | None = Field(default=8, ge=1)
    """Requests in flight at once (closed loop); give this or request_rate."""
    isl: int = Field(default=128, ge=1)
    """Input (prompt) length in tokens."""
    osl: int = Field(default=64, ge=1)
    """Output length in tokens."""
    shared_prefix_tokens: int = Field(default=0, ge=0)
    """Leading prompt tokens every request shares (a system prompt), < isl. With serve.enable_kv_cache_reuse the
    plan keeps their KV blocks once and prefill skips them; the bench's random prompts share this prefix."""

    @model_validator(mode="after")
    def _targets(self) -> SlaSection:
        if self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None:
            raise rule("tpot_ms", "no latency target: set at least one of ttft_ms, tpot_ms, e2e_ms")
        if self.request_rate is not None and self.concurrency is not None:
            raise rule("request_rate", "give request_rate or concurrency, not both (set concurrency: null)")
        if self.request_rate is None and self.concurrency is None:
            raise rule("concurrency", "no load: set concurrency (requests in flight) or request_rate (req/s)")
        if self.shared_prefix_tokens >= self.isl:
            raise rule("shared_prefix_tokens", f"{self.shared_prefix_tokens} must be less than isl={self.isl}: every "
                                               "prompt has tokens of its own; lower it or raise isl")
        return self
