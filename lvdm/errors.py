"""Exceptions for user mistakes: each says what was wrong, the value, and what is allowed.

The command-line scripts print these as one line and exit non-zero; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


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
