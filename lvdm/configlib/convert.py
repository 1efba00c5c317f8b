"""Checking plain data (merged YAML and overrides) against the dataclass schema: types, ranges, unknown keys."""

from __future__ import annotations

import math
import numbers
import operator
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from lvdm.configlib.common import (
    BROKEN,
    DEFAULT,
    INVALID,
    UNSET,
    Sentinel,
    join_path,
    show_value,
    type_hints,
)
from lvdm.errors import ConfigError, closest

T = TypeVar("T")


def type_name(tp: Any) -> str:
    """How a type reads in a problem or in ``describe_config``: ``int or null``, ``list of int``."""
    origin, args = get_origin(tp) or tp, get_args(tp)
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return "[" + ", ".join(type_name(arg) for arg in args) + "]"
    if origin in (list, tuple):
        return f"list of {type_name(args[0] if args else Any)}"
    if origin is dict:
        key, value = args or (Any, Any)
        return f"mapping of {type_name(key)} to {type_name(value)}"
    return getattr(tp, "__name__", repr(tp))


def _mismatch(tp: Any, value: Any, path: str, problems: list[str]) -> Sentinel:
    problems.append(_nan_problem(tp, value, {}, path) or f"{path}: expected {type_name(tp)}, got {show_value(value)}")
    return INVALID


def _nan_problem(tp: Any, value: Any, metadata: Mapping[str, Any], path: str) -> str | None:
    """NaN where a number goes, said with the numbers allowed (``metadata``'s bounds); it read "expected float or
    null, got nan (float)", a float refused for not being one. ``None`` for any other value."""
    union = get_origin(tp) in (Union, types.UnionType)  # float | None takes a number; list[float] a list of them
    kinds = (tp, *(get_args(tp) if union else ()))
    if isinstance(value, list) and any(_is_nan(v) for v in value):  # [1, nan]: the element
        lists = [kind for kind in kinds if get_origin(kind) in (list, tuple) and float in get_args(kind)]
        problem = _nan_problem(float, float("nan"), metadata, path) if lists else None
        return problem and f"{problem} in {show_value(value).rsplit(' (', 1)[0]}"
    if not _is_nan(value) or float not in kinds:
        return None
    if "min" in metadata and "max" in metadata:
        allowed = f" in {metadata['min']} .. {metadata['max']}"
    else:
        allowed = " and".join(f" {BOUNDS[key][1]} {metadata[key]}" for key in ("min", "gt", "max") if key in metadata)
    return f"{path}: must be a number{allowed}, got nan"


def _is_nan(value: Any) -> bool:
    return isinstance(value, numbers.Real) and value != value  # numpy's floats too


def _to_bool(value: Any) -> Any:
    numpy = sys.modules.get("numpy")  # numpy's bool, as check_flag takes it (none exists before numpy is imported)
    if numpy is not None and isinstance(value, numpy.bool_):
        return bool(value)
    return value if isinstance(value, bool) else INVALID


def _to_int(value: Any) -> Any:
    """An integer, or a whole float; numpy's too (``np.int64(16)``, ``np.float32(2.0)``), as a Python ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return INVALID
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(value) if float(value).is_integer() else INVALID


def _to_float(value: Any) -> Any:
    """A real number, numpy's too (``np.float32(7.5)``), as a Python ``float``; an int past float's range is as large
    as a float gets, for the field's bounds to refuse (``float(10**400)`` raised OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or _is_nan(value):
        return INVALID
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _to_str(value: Any) -> Any:
    return value if isinstance(value, str) else INVALID


_SCALARS: dict[type, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _to_literal(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    choices = get_args(tp)
    if any(value == choice and type(value) is type(choice) for choice in choices):
        return value
    close = closest(value, choices) if isinstance(value, str) else None
    hint = f" (did you mean {close!r}?)" if close else ""
    problems.append(f"{path}: expected {type_name(tp)}, got {show_value(value)}{hint}")
    return INVALID


def _same_shape(tp: Any, value: Any) -> bool:
    """Whether ``value`` is the right kind of container for ``tp``, so its inner problems are the useful ones."""
    origin = get_origin(tp) or tp
    if is_dataclass(tp) or origin is dict:
        return isinstance(value, Mapping)
    return origin in (list, tuple) and isinstance(value, (list, tuple))


def _to_union(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    arms = [arg for arg in args if arg is not type(None)]
    scratch: list[str] = []
    for arm in arms:
        scratch = []
        out = _convert(arm, value, path, scratch)
        if out is not INVALID:
            problems.extend(scratch)
            return out
    if len(arms) == 1 and _same_shape(arms[0], value):
        problems.extend(scratch)
        return INVALID
    return _mismatch(tp, value, path, problems)


def _to_sequence(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """``list[X]``, ``tuple[X, ...]`` or a fixed ``tuple[X, Y]``, each given as a YAML list."""
    origin, args = get_origin(tp) or tp, get_args(tp)
    fixed = origin is tuple and args and args[-1] is not Ellipsis
    if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(args)):
        return _mismatch(tp, value, path, problems)
    item_types = args if fixed else [args[0] if args else Any] * len(value)
    pairs = enumerate(zip(item_types, value, strict=True))
    items = [_convert(item_type, item, f"{path}[{i}]", problems) for i, (item_type, item) in pairs]
    if any(item is INVALID for item in items):
        return INVALID
    return tuple(items) if origin is tuple else items


def _to_dict(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    key_type, value_type = get_args(tp) or (Any, Any)
    if not isinstance(value, Mapping):
        return _mismatch(tp, value, path, problems)
    out = {}
    for key, item in value.items():
        out[_convert(key_type, key, f"{path} (key {key!r})", problems)] = _convert(
            value_type, item, join_path(path, key), problems
        )
    return INVALID if INVALID in out or INVALID in out.values() else out


_GENERICS: dict[Any, Callable[[Any, Any, str, list[str]], Any]] = {
    Literal: _to_literal,
    Union: _to_union,
    types.UnionType: _to_union,
    list: _to_sequence,
    tuple: _to_sequence,
    dict: _to_dict,
}


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """``value`` checked against type ``tp`` (and converted: int -> float, list -> tuple), or ``INVALID``."""
    if value is BROKEN:
        return INVALID
    if value is UNSET:
        problems.append(f"{path}: required, not set (still '???')")
        return INVALID
    if tp is Any:
        return value
    if is_dataclass(tp):
        return build_dataclass(tp, value, path, problems)
    origin = get_origin(tp) or tp
    if origin in _GENERICS:
        return _GENERICS[origin](tp, value, path, problems)
    if tp in _SCALARS:
        out = _SCALARS[tp](value)
        return _mismatch(tp, value, path, problems) if out is INVALID else out
    raise TypeError(f"{path}: config fields of type {tp!r} are not supported")


BOUNDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "min": (operator.ge, ">="),
    "max": (operator.le, "<="),
    "gt": (operator.gt, ">"),
    "multiple_of": (lambda value, step: value % step == 0, "a multiple of"),
}
"""The bounds an :func:`~lvdm.configlib.option` can set, by metadata key: (check of value against bound, how a
problem or ``describe_config`` words it)."""


def _range_problems(value: Any, metadata: Mapping[str, Any], path: str) -> list[str]:
    """The field's declared bounds and ``choices`` checked on ``value`` (or each list element)."""
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in _range_problems(item, metadata, f"{path}[{i}]")]
    problems = []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, (within, sign) in BOUNDS.items():
            if key in metadata and not within(value, metadata[key]):
                problems.append(f"{path}: must be {sign} {metadata[key]}, got {value!r}")
    if value is not None and "choices" in metadata and value not in metadata["choices"]:
        allowed = ", ".join(repr(choice) for choice in metadata["choices"])
        problems.append(f"{path}: expected one of {allowed}, got {show_value(value)}")
    return problems


def _field_value(spec: Any, tp: Any, data: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    """One dataclass field's checked value from ``data``; ``DEFAULT`` if left out and defaulted."""
    if spec.name not in data:
        if spec.default is not MISSING or spec.default_factory is not MISSING:
            return DEFAULT
        if is_dataclass(tp):  # a missing section: report the fields it needs, not the section
            return build_dataclass(tp, {}, path, problems)
        problems.append(f"{path}: required, not set")
        return INVALID
    raw = data[spec.name]
    if problem := _nan_problem(tp, raw, spec.metadata, path):
        problems.append(problem)
        return INVALID
    coerce = spec.metadata.get("coerce")
    value = _convert(tp, coerce(raw) if coerce and not isinstance(raw, Sentinel) else raw, path, problems)
    if value is not INVALID:
        problems.extend(_range_problems(value, spec.metadata, path))
    return value


def _unknown_key(path: str, key: Any, known: list[str]) -> str:
    close = closest(key, known)
    hint = f" (did you mean '{join_path(path, close)}'?)" if close else ""
    return f"unknown key '{join_path(path, key)}'{hint}"


def _run_validate(instance: Any, path: str, known: list[str], problems: list[str]) -> None:
    """The dataclass's own ``validate()`` rules, each message put under the section's key path."""
    validate = getattr(instance, "validate", None)
    for message in validate() if callable(validate) else ():
        head = re.match(r"[A-Za-z_]\w*", message)
        if not path:
            problems.append(message)
        elif head and head.group() in known:
            problems.append(f"{path}.{message}")
        else:
            problems.append(f"{path}: {message}")


def build_dataclass(cls: type[T], data: Any, path: str, problems: list[str]) -> T | Sentinel:
    """``data`` checked against dataclass ``cls``: the instance, or ``INVALID`` with its problems recorded."""
    if not isinstance(data, Mapping):
        return _mismatch(cls, data, path or "config", problems)
    specs = [spec for spec in fields(cls) if spec.init]
    known = [spec.name for spec in specs]
    problems.extend(_unknown_key(path, key, known) for key in data if key not in known)
    values, complete = {}, True
    for spec in specs:
        value = _field_value(spec, type_hints(cls)[spec.name], data, join_path(path, spec.name), problems)
        if value is INVALID:
            complete = False
        elif value is not DEFAULT:
            values[spec.name] = value
    if not complete:
        return INVALID
    instance = cls(**values)
    _run_validate(instance, path, known, problems)
    return instance


MAX_LISTED = 40  # problems printed; a 2000-link interpolation chain printed 1941 lines


def raise_problems(problems: list[str]) -> None:
    """One :class:`ConfigError` listing every problem, one per line, the first :data:`MAX_LISTED` of a flood
    (all are kept as ``error.problems``)."""
    if not problems:
        return
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    listed = [f"  {problem}" for problem in problems[:MAX_LISTED]]
    listed += [f"  ... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []
    error = ConfigError(f"invalid config ({count}):\n" + "\n".join(listed))
    error.problems = list(problems)
    raise error
