"""Helpers the config modules share: value display, type hints, sentinels."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, get_type_hints


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _show(value: Any) -> str:
    """``'ten' (str)``: a value and its type, as problems quote it."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {spec.name: _plain(getattr(value, spec.name)) for spec in fields(value) if spec.init}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_INVALID = _Sentinel("<invalid>")  # a value that failed its checks (the problem is already recorded)
_UNSET = _Sentinel("???")  # OmegaConf's mandatory-value marker: "required, not set"
_BROKEN = _Sentinel("<unresolvable>")  # an interpolation that could not be resolved (already recorded)
_DEFAULT = _Sentinel("<default>")  # a field left out: its dataclass default applies
