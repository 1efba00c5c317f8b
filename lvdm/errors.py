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
