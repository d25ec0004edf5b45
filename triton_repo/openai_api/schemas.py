"""Request bodies of the OpenAI API, as far as the front implements them.

Fields the API defines but the front cannot honour (logprobs, tools, n > 1, echo, ...) are refused with a 400
naming the field instead of being dropped; unknown fields are ignored, as OpenAI-compatible servers do.
`top_k`, `min_tokens`, `ignore_eos` and `repetition_penalty` are vLLM's extensions under vLLM's names.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from enginesmith.triton_repo.openai_api.errors import ApiError, bad_request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(None, gt=0)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise bad_request(f"stop={self.stop!r}: give up to 4 non-empty stop strings", "stop")
        return stops

    def refused(self) -> tuple[str, str] | None:
        """(field, why) of the first field set to something the front cannot do."""
        if self.n not in (None, 1):
            return "n", f"n={self.n}: only n=1 is supported (one choice per request); send several requests"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refused(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo=true is not supported"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if self.best_of not in (None, 1):
            return "best_of", f"best_of={self.best_of}: only 1 is supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().refused()

    def single_prompt(self) -> str | list[int]:
        """The one prompt (text or token ids) of the request."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise bad_request(f"prompt: {len(p)} prompts in one request; send one prompt per request", "prompt")
            p = p[0]
        if not p:
            raise bad_request("prompt is empty: give the text (or token ids) to complete", "prompt")
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def refused(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported"
        if self.tools or self.functions:
            return "tools", "tool calls are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", f"response_format {self.response_format.get('type')!r}: only 'text' is supported"
        return super().refused()

    def message_dicts(self) -> list[dict[str, Any]]:
        """Messages as the chat template takes them; content parts other than text are refused."""
        out = []
        for i, m in enumerate(self.messages):
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                parts = []
                for part in m.content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad_request(f"messages[{i}].content: part of type {part.get('type')!r} is not "
                                          "supported; this model takes text parts only", f"messages[{i}].content")
                    parts.append(part["text"])
                d["content"] = "".join(parts)
            out.append(d)
        return out


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|[a-z]+\[.*\])$")
"""How pydantic names the member of a union a value failed (a part of an error's location)."""
_FORMS = {"prompt": "a string, a list of token ids, or a list holding one of those",
          "stop": "a string or a list of up to 4 strings", "content": "a string or a list of text parts"}


def _param(loc: tuple) -> str | None:
    """An error location as OpenAI names parameters (messages[0].content), cut at the union member."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_MEMBER.match(str(part)):
            break
        else:
            out += f".{part}" if out else str(part)
    return out or None


def parse(cls: type[_Common], body: Any) -> _Common:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        if err["type"] == "missing":
            raise ApiError(400, f"{param}: required", param) from None
        field = (param or "").rsplit(".", 1)[-1].split("[")[0]
        value = _value(body, err["loc"])
        why = f"must be {_FORMS[field]}" if field in _FORMS and param.endswith(field) else err["msg"]
        raise ApiError(400, f"{param}={value!r}: {why}", param) from None
    if (why := req.refused()) is not None:
        raise bad_request(why[1], why[0])
    return req


def _value(body: Any, loc: tuple) -> Any:
    """The value at an error location of the body (up to the union member)."""
    for part in loc:
        if isinstance(part, str) and _UNION_MEMBER.match(part):
            break
        try:
            body = body[part]
        except (KeyError, IndexError, TypeError):
            break
    return body
