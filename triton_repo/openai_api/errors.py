"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status."""

from __future__ import annotations

from typing import Any

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 499: "invalid_request_error",
          500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request the front refuses (4xx) or could not serve (5xx)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist: this server serves '{served}' (GET /v1/models)",
                    "model", "model_not_found")
