"""``skipped.jsonl``: the files a cache build or a training run skipped, one ``{"path", "reason"}`` row per file.

A resumed build or run reads the rows already there and does not log those files again; a line cut short by a
kill is ended and ignored. Only a regular file is read or written: a link in its place (which would be written
through, into whatever it names), a FIFO (which would hang the build) or a folder is a :class:`DataError`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from lvdm.errors import DataError
from lvdm.fileio import atomic_path, json_text, read_bounded

MAX_BYTES = 64 << 20  # a log of about half a million skipped files


class SkipLog:
    """The rows of ``path`` (``path -> reason``), appended to once per new file by :meth:`add`; ``path=None``: kept
    in memory only."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.logged: dict[str, str] = {}
        text = ""
        if self.path is not None and (self.path.exists() or self.path.is_symlink()):
            if self.path.is_symlink() or not self.path.is_file():
                raise DataError(f"{self.path} is not a regular file (a link, folder or pipe): not lvdm's skip log")
            try:
                text = read_bounded(self.path, MAX_BYTES, regular_only=True).decode("utf-8", errors="replace")
            except OSError as exc:
                raise DataError(f"{self.path} cannot be read ({exc.strerror or exc})") from exc
        if text and not text.endswith("\n"):  # end the cut line, so the next entry starts a line of its own
            self._append("\n")
        for line in text.split("\n"):  # not splitlines(): a path may hold U+2028 or U+0085, written raw (json_text)
            try:
                row = json.loads(line)
                self.logged[str(row["path"])] = str(row["reason"])
            except (ValueError, RecursionError, KeyError, TypeError, IndexError):
                continue  # a line cut short by an interruption, or not lvdm's

    def add(self, path: str, reason: str) -> bool:
        """Log ``path`` unless it is logged already; whether it was new."""
        if path in self.logged:
            return False
        self.logged[path] = reason
        self._append(json_text({"path": path, "reason": reason}) + "\n")
        return True

    def remove(self, paths: list[str]) -> None:
        """Drop the rows of ``paths`` (files mended since): the log is rewritten without them."""
        gone = [path for path in paths if path in self.logged]
        if not gone:
            return
        for path in gone:
            del self.logged[path]
        if self.path is not None:
            with atomic_path(self.path) as temp:
                text = "".join(
                    json_text({"path": path, "reason": reason}) + "\n" for path, reason in self.logged.items()
                )
                temp.write_text(text, encoding="utf-8")

    def _append(self, text: str) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:  # not through a link put there since, not waiting on a pipe
            fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            raise DataError(f"{self.path} cannot be written ({exc.strerror or exc})") from exc
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError(f"{self.path} is not a regular file: not lvdm's skip log")
            handle.write(text)
