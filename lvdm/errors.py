"""Exceptions for user mistakes: each says what was wrong, the value, and what is allowed.

The command-line scripts print these as one line and exit non-zero; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

_T = TypeVar("_T")


class LvdmError(Exception):
    """Base class of every user-facing lvdm error."""


class CheckpointError(LvdmError, ValueError):
    """A weights file that cannot be used: missing, corrupt, pickled without permission, or mismatched."""


class TemporalModuleError(CheckpointError):
    """A temporal module file that cannot be loaded onto this base."""


class OutputWriteError(LvdmError, OSError):
    """A file lvdm writes could not be written (disk full, permissions); still an OSError for old callers."""


class ConfigError(LvdmError, ValueError):
    """A configuration that cannot run: every problem found, each with its key path."""


class DataError(LvdmError):
    """A dataset that cannot be used: missing files, bad rows, or too many unreadable samples."""


class VideoReadError(DataError):
    """One video (or image) that could not be decoded; ``reason`` says why in a few words."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class KeywordError(ConfigError, TypeError):
    """An unknown keyword argument of a public function: still the TypeError Python raises, and a ConfigError (one
    line from the CLIs) that also names the closest keyword and the ones allowed."""


def check_flag(name: str, value: object) -> None:
    """A :class:`ConfigError` unless ``value`` is ``True`` or ``False`` (numpy's too): ``"no"`` is truthy, and
    ``overwrite="no"`` replaced the file it was meant to keep."""
    import numpy as np

    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def closest(name: object, choices: Iterable[object]) -> str | None:
    """The choice closest to ``name`` (difflib's, as strings), or ``None``: the "did you mean" of every refusal of
    an unknown name."""
    close = difflib.get_close_matches(str(name), [str(choice) for choice in choices], n=1)
    return close[0] if close else None


def checked_keywords(function: Callable[..., _T] | None = None, *, also: Iterable[str] = ()) -> Any:
    """``function`` refusing a keyword it does not take with a :class:`KeywordError`: "did you mean" and the
    keywords it takes, where Python's own TypeError names only the wrong one. The signature stays visible to
    ``help()`` and editors (``functools.wraps``). ``@checked_keywords(also=names)``: a function whose ``**kwargs``
    take ``names`` (the sampling settings) refuses any other keyword the same way."""
    import functools
    import inspect

    if function is None:
        return functools.partial(checked_keywords, also=also)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = list(inspect.signature(function).parameters.values())[1:]  # without self or cls
    known = [p.name for p in parameters if p.kind in kinds] + list(also)
    name = function.__qualname__.replace(".__call__", "")

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> _T:
        unknown = [key for key in kwargs if key not in known]
        if unknown:
            hints = [
                f"{key!r}" + (f" (did you mean {close!r}?)" if (close := closest(key, known)) else "")
                for key in unknown
            ]
            raise KeywordError(f"{name}() got unknown keyword {', '.join(hints)}; it takes {', '.join(known)}")
        return function(*args, **kwargs)

    return checked
