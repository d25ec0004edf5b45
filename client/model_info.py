"""What the client needs to know about a served model, read from its config (gRPC or HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from enginesmith.client.params import ClientError, ServerUnreachable, contract_of

UNREACHABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_batch_size: int
    decoupled: bool
    inputs: frozenset[str] = field(default_factory=frozenset)
    outputs: frozenset[str] = field(default_factory=frozenset)

    @property
    def contract(self) -> str:
        return contract_of(set(self.inputs), self.name)

    @property
    def batched(self) -> bool:
        """Requests carry a leading batch dimension (max_batch_size > 0)."""
        return self.max_batch_size > 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelInfo:
        """From the JSON form of a ModelConfig (`/v2/models/<m>/config`, or gRPC `as_json=True`)."""
        policy = cfg.get("model_transaction_policy") or {}
        return cls(
            name=cfg.get("name", ""),
            max_batch_size=int(cfg.get("max_batch_size", 0) or 0),
            decoupled=bool(policy.get("decoupled", False)),
            inputs=frozenset(i["name"] for i in cfg.get("input", [])),
            outputs=frozenset(o["name"] for o in cfg.get("output", [])),
        )


def _config_error(e: Any, model: str) -> Exception:
    if e.status() in UNREACHABLE:
        return ServerUnreachable(f"the server is unreachable: {e.message()}")
    return ClientError(f"model {model!r}: {e.message()} (is it loaded? list: /v2/repository/index)")


def grpc_model_info(client: Any, model: str) -> ModelInfo:
    """Read a model's config with a tritonclient.grpc client; ServerUnreachable when no server answers,
    a ClientError when the server lacks the model."""
    from tritonclient.utils import InferenceServerException

    try:
        cfg = client.get_model_config(model, as_json=True)
    except InferenceServerException as e:
        raise _config_error(e, model) from e
    return ModelInfo.from_config(cfg["config"])


async def grpc_aio_model_info(client: Any, model: str) -> ModelInfo:
    from tritonclient.utils import InferenceServerException

    try:
        cfg = await client.get_model_config(model, as_json=True)
    except InferenceServerException as e:
        raise _config_error(e, model) from e
    return ModelInfo.from_config(cfg["config"])
