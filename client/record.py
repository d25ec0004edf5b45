"""One benchmark request as measured by the client (steady clock), plus what the server reported."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    request_id: str
    prompt_len: int
    expected_output_len: int
    issue_ns: int = 0
    """When the load generator released the request (rate schedule / a concurrency slot freed)."""
    start_ns: int = 0
    """When it was sent (time.monotonic_ns)."""
    end_ns: int = 0
    """When the final response arrived."""
    chunk_ns: list[int] = field(default_factory=list)
    """Arrival of each response that carried tokens."""
    chunk_tokens: list[int] = field(default_factory=list)
    """Tokens in each of those responses."""
    error: str | None = None
    server_times_ns: dict[str, int] = field(default_factory=dict)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    """Output ids (tokens contract); decoded into `text` after the run, outside the timed part."""

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def success(self) -> bool:
        return self.error is None and self.output_tokens > 0

    @property
    def ttft_s(self) -> float:
        return (self.chunk_ns[0] - self.start_ns) / 1e9 if self.chunk_ns else 0.0

    @property
    def e2e_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def itls_s(self) -> list[float]:
        """Gap between consecutive responses (vLLM's `itl`: one entry per chunk after the first)."""
        return [(b - a) / 1e9 for a, b in zip(self.chunk_ns, self.chunk_ns[1:], strict=False)]

    @property
    def tpot_s(self) -> float:
        """(E2E - TTFT) / (output tokens - 1); 0 for a single-token output (as vLLM counts it for goodput)."""
        n = self.output_tokens
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else 0.0

    @property
    def client_queue_s(self) -> float:
        """Time the request waited inside the load generator before it was sent."""
        return max(0.0, (self.start_ns - self.issue_ns) / 1e9) if self.issue_ns else 0.0
