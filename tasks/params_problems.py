"""A pydantic error about params.yaml as one sentence naming the dotted key and what it may be."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def problem(error: Any, model: type[BaseModel], source: str) -> str:
    """One pydantic error as a sentence naming the dotted key and what it may be."""
    field, key = _field_at(model, error["loc"])
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return f"unknown key {key}; remove it or fix its spelling"
    if kind == "missing":
        return f"{key} is missing; add it to {source}"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "literal_error" or kind in _BOUND_ERRORS:
        allowed = _allowed(field) if field is not None else ""
        return f"{key} must be {allowed or _bound_of(error)}, got {value!r}"
    return f"{key} = {value!r} is not a valid {kind.removesuffix('_type').removesuffix('_parsing')}"


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short")


def _field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[FieldInfo | None, str]:
    """The field an error points at (None inside a list or dict) and its dotted key."""
    key = getattr(model, "KEY", "")
    field: FieldInfo | None = None
    current: Any = model
    for part in loc:
        key = f"{key}.{part}" if key else str(part)
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            field = current.model_fields[part]
            current = field.annotation
        else:
            field, current = None, None
    return field, key


def _allowed(field: FieldInfo) -> str:
    """What a field accepts, from its annotation and bounds: "between 0 and 1", "one of a, b"."""
    args = typing.get_args(field.annotation)
    nullable = typing.get_origin(field.annotation) in (typing.Union, types.UnionType) and type(None) in args
    literal = next((a for a in (field.annotation, *args) if typing.get_origin(a) is Literal), None)
    bounds = {_BOUNDS[name]: getattr(m, name) for m in field.metadata for name in _BOUNDS if hasattr(m, name)}
    if literal is not None:
        allowed = "one of " + ", ".join(str(choice) for choice in typing.get_args(literal))
    elif ">=" in bounds and "<=" in bounds:
        allowed = f"between {_number(bounds['>='])} and {_number(bounds['<='])}"
    else:
        allowed = " and ".join(f"{op} {_number(limit)}" for op, limit in bounds.items())
    if not nullable or not allowed:
        return allowed
    meaning = f" ({field.description})" if field.description else ""
    return f"null{meaning} or {allowed}"


def _number(limit: float) -> str:
    """A bound as written in params.yaml: 178956970, not 1.78957e+08; 0.5, not 0.500000."""
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def _bound_of(error: Any) -> str:
    ctx = error.get("ctx", {})
    return " and ".join(f"{op} {ctx[name]}" for name, op in _BOUNDS.items() if name in ctx) or error["msg"]
