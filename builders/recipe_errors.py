"""Turn pydantic's validation errors into one line per problem: the recipe field path, what is wrong, the fix."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError


class RecipeError(ValueError):
    """A recipe that cannot be planned; the message names each bad field path and its fix."""


def rule(field: str, message: str) -> PydanticCustomError:
    """An error from a cross-field check; `field` is relative to the model whose validator raises it."""
    return PydanticCustomError("recipe_rule", "{field}: {message}", {"field": field, "message": message})


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside a field annotation (`X`, `X | None`, `Literal[...] | X`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _model_of(arg)) is not None:
                return found
    return None


def _walk(root: type[BaseModel], loc: tuple, keep_last: bool) -> tuple[list[str], type[BaseModel] | None]:
    """Field path of a pydantic `loc` without union-member tags, plus the model owning the last field."""
    path: list[str] = []
    cls: type[BaseModel] | None = root
    owner = root
    for i, part in enumerate(loc):
        if cls is not None and isinstance(part, str) and part in cls.model_fields:
            path.append(part)
            owner = cls
            cls = _model_of(cls.model_fields[part].annotation)
        elif part == "[key]":
            continue  # pydantic marks errors in a dict key with "[key]" after the key itself
        elif cls is None or isinstance(part, int) or (keep_last and i == len(loc) - 1):
            path.append(str(part))
            owner = cls if cls is not None else owner
        # else: a union member tag such as "literal['auto']" or "ParallelSection": not part of the path
    return path, owner


def _describe(owner: type[BaseModel] | None, name: str) -> str:
    field = owner.model_fields.get(name) if owner else None
    doc = " ".join((field.description or "").split()) if field else ""
    return f" ({doc})" if doc else ""


def _line(err: dict[str, Any], root: type[BaseModel]) -> tuple[list[str], str, str]:
    kind = err["type"]
    path, owner = _walk(root, tuple(err["loc"]), keep_last=kind == "extra_forbidden")
    where = ".".join(path) or "recipe"
    if kind == "recipe_rule":
        path = [*path, *err["ctx"]["field"].split(".")]
        return path, kind, f"{'.'.join(path)}: {err['ctx']['message']}"
    if kind == "extra_forbidden":
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(path[-1], valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return path, kind, f"{where}: unknown field{hint} Valid fields here: {', '.join(valid)}"
    if kind == "missing":
        return path, kind, f"{where}: required field is missing; add it{_describe(owner, path[-1])}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return path, kind, f"{where}: {msg}"
    return path, kind, f"{where}: {msg} (got {err.get('input')!r})"


def format_validation_error(err: ValidationError, root: type[BaseModel]) -> str:
    """One line per problem, union noise removed (e.g. `parallel` is 'auto' or a mapping)."""
    lines = [_line(e, root) for e in err.errors(include_url=False)]
    deep = {tuple(p[:1]) for p, _, _ in lines if len(p) > 1}
    out: list[str] = []
    for path, kind, text in lines:
        if len(path) == 1 and tuple(path) in deep and kind in ("literal_error", "model_type", "dict_type"):
            continue  # the other branch of a union failed too; the deeper error is the useful one
        if path == ["parallel"] and kind in ("literal_error", "model_type"):
            text = ("parallel: must be 'auto' or a mapping of tp_size, pp_size, moe_ep_size, moe_tp_size, "
                    "pp_micro_batches")
        if text not in out:
            out.append(text)
    return "\n".join(out)
