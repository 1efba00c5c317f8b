"""Helpers the config modules share: value display, type hints, sentinels."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, get_type_hints


def join_path(path: str, key: Any) -> str:
    """The key path of ``key`` under ``path``, as problems name it: ``train.lr``, or ``lr`` at the top."""
    return f"{path}.{key}" if path else str(key)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def show_value(value: Any) -> str:
    """``'ten' (str)``: a value and its type, as problems quote it."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a dataclass, cached: its fields' types with the string annotations resolved."""
    return get_type_hints(cls)


def plain_data(value: Any) -> Any:
    """``value`` as plain data: dataclasses and mappings as dicts (init fields only), tuples as lists, recursively."""
    if is_dataclass(value) and not isinstance(value, type):
        return {spec.name: plain_data(getattr(value, spec.name)) for spec in fields(value) if spec.init}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    if isinstance(value, Mapping):
        return {key: plain_data(item) for key, item in value.items()}
    return value


class Sentinel:
    """A marker value that no config value can equal, shown by its name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


INVALID = Sentinel("<invalid>")  # a value that failed its checks (the problem is already recorded)
UNSET = Sentinel("???")  # OmegaConf's mandatory-value marker: "required, not set"
BROKEN = Sentinel("<unresolvable>")  # an interpolation that could not be resolved (already recorded)
DEFAULT = Sentinel("<default>")  # a field left out: its dataclass default applies
