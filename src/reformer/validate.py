"""Field checks for the run dataclasses: each value against its annotation, and ranges.

Every run config is validated at construction, whatever built it (Python, a YAML/TOML file
through `config_from_dict`, or tyro's flags), so a bad value fails before any file is
written, with a message naming the field as the user writes it (`optim.lr`), the value and
what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from typing import Any, Literal, Union


def check_annotations(obj: Any, prefix: str) -> None:
    """Each field of dataclass `obj` against its annotation: Literal choices, bool, int,
    float (an int is accepted), str, tuples of ints, and `X | None`. Nested dataclasses are
    checked by their own __post_init__."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check(prefix + f.name, getattr(obj, f.name), hints[f.name])


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of ints"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp) and not isinstance(value, bool)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    return True  # anything else: not ours to police


def _check(name: str, value: Any, tp: Any) -> None:
    if _matches(value, tp):
        return
    arms = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    allowed = " or ".join(_describe(a) for a in arms)
    if _is_union(tp) and type(None) in typing.get_args(tp):
        allowed += " or null"
    literal = any(typing.get_origin(a) is Literal for a in arms)
    err = ValueError if literal else TypeError
    hint = ""
    if float in arms and isinstance(value, str):
        with contextlib.suppress(ValueError):
            float(value)  # YAML 1.1 reads 1e-3 as a string; 1.0e-3 is a float
            hint = f" (in YAML write {float(value)!r}: it reads {value} as text)"
    raise err(f"{name} must be {'one of ' if literal else ''}{allowed}; got {value!r}{hint}")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def at_least(name: str, value: float, low: float, *, strict: bool = False) -> None:
    """value >= low (value > low when strict), else a ValueError naming the field."""
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}; got {value!r}")


def within(name: str, value: float, low: float, high: float, *, open_high: bool = False) -> None:
    """low <= value <= high (or < high), else a ValueError naming the field."""
    if not (low <= value < high if open_high else low <= value <= high):
        bracket = ")" if open_high else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}; got {value!r}")
