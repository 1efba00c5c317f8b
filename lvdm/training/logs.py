"""Where training numbers go: a JSONL file (one object per logged step) and TensorBoard.

On resume, :func:`truncate_log` drops the records after the checkpoint's step (they will be logged again), and
TensorBoard is told to purge its events from there, so no step appears twice (a run resumed at its last step
validates that step again: TensorBoard forgets the step, and is given the records of it that the log keeps). A full
disk or an unwritable log is a one-line :class:`~lvdm.errors.LvdmError`; the checkpoints already written are not
touched.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path
from typing import Any

from lvdm.errors import LvdmError
from lvdm.fileio import atomic_path, read_bounded


class RunLog:
    """Append-only ``log.jsonl`` plus TensorBoard scalars under ``tensorboard/``, main process only."""

    def __init__(self, output_dir: Path, *, enabled: bool = True, validated_again: int | None = None) -> None:
        """``validated_again``: the step a resumed run validates once more (its last; see :func:`truncate_log`)."""
        self.enabled = enabled
        self.path = output_dir / "log.jsonl"
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_threads()
            last = last_step(self.path)  # a resumed run: TensorBoard forgets what came after (see truncate_log)
            again = last is not None and last == validated_again  # its figures and videos come again: forgotten too
            purge = None if last is None else last if again else last + 1
            self._writer = _guarded(self.path.parent / "tensorboard", SummaryWriter, str(output_dir / "tensorboard"),
                                    purge_step=purge)  # fmt: skip
            for record in _records(self.path) if again else []:  # what the log keeps of that step: its training
                if record.get("step") == last:
                    self._scalars(record)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        _guarded(self.path, _append_line, self.path, json.dumps(record) + "\n")
        self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                _guarded(self.path.parent / "tensorboard", self._writer.add_scalar, key, value, record["step"])

    def add_videos(self, videos: dict[str, Any], step: int, *, fps: float | None = None) -> None:
        """Each uint8 ``(n, f, h, w, 3)`` array under its tag as animated GIFs (TensorBoard's images tab; written
        with PIL, since ``SummaryWriter.add_video`` needs moviepy), at ``fps`` (None: no clip rate is known, as when
        only still images train: sampling's default, as the sample files)."""
        if not self.enabled:
            return
        from lvdm.sampling_settings import DEFAULT_FPS
        from lvdm.training.validation import gif_summary

        for tag, array in videos.items():
            summary = gif_summary(f"samples/{tag}", array, fps=fps or DEFAULT_FPS)
            _guarded(self.path.parent / "tensorboard", self._writer._get_file_writer().add_summary, summary, step)

    def close(self) -> None:
        if self._writer is not None:
            _guarded(self.path.parent / "tensorboard", self._writer.close)


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread prints its ``OSError`` (a full disk) as a traceback, then hands it to the main
    thread's next write, which :func:`_guarded` makes one line: the thread's print is left out, once per process."""
    previous = threading.excepthook
    if getattr(previous, "lvdm_quiet", False):
        return

    def hook(args: Any) -> None:
        if issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.lvdm_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _append_line(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)


def _guarded(target: Path, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)``, with an OSError (disk full, permissions) turned into one line naming ``target``."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        try:
            free = f"{shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        reason = exc.strerror or str(exc)
        raise LvdmError(f"could not write {target}: {reason} ({free}); the checkpoints are intact") from exc


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


MAX_LOG_BYTES = 1 << 30  # a line per logged step: millions of steps


def _lines(path: Path) -> list[str]:
    """The lines of a ``log.jsonl`` (none when there is none). A link, folder or pipe by its name is refused in one
    line, not read: a FIFO would wait forever for a writer, and lvdm appends to this file."""
    if not (path.exists() or path.is_symlink()):
        return []
    if path.is_symlink() or not path.is_file():
        raise LvdmError(f"{path} is not a regular file (a link, folder or pipe): not lvdm's log; move it away")
    try:
        data = read_bounded(path, MAX_LOG_BYTES, regular_only=True)
    except OSError as exc:
        raise LvdmError(f"{path} cannot be read ({exc.strerror or exc})") from exc
    return data.decode("utf-8", errors="replace").splitlines()


def _records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``; a line cut short by a crash (not JSON, or nested past Python's recursion
    limit) is left out."""
    records = []
    for line in _lines(path):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every record of a ``log.jsonl``."""
    return _records(path)


def last_step(path: Path) -> int | None:
    """The highest step logged in ``path``, or None when there is no log."""
    steps = [r["step"] for r in _records(path) if type(r.get("step")) is int]
    return max(steps) if steps else None


def truncate_log(path: Path, step: int, *, validates_again: bool = False) -> int:
    """Keep only the records of steps up to ``step`` (a resume from that checkpoint), but for the steps skipped after
    it (logged at ``step``, the last that completed: the resumed run skips them again); returns how many were dropped.
    ``validates_again``: the run validates ``step`` once more (its last step, validated after its checkpoint was
    saved), so that step's validation records go too (they were logged twice)."""
    lines = _lines(path)
    if not lines:
        return 0
    kept = [
        r for r in _records(path) if type(r.get("step")) is int and r["step"] <= step and not _skipped_after(r, step)
    ]
    if validates_again:  # a step's training record has its loss; validation's figures do not
        kept = [r for r in kept if r["step"] < step or "loss" in r]
    if len(kept) == len(lines):
        return 0
    with atomic_path(path) as temp:
        _guarded(path, temp.write_text, "".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return len(lines) - len(kept)


def _skipped_after(record: dict[str, Any], step: int) -> bool:
    """A record of a step skipped for a non-finite loss or gradient (``Trainer._skip_nonfinite``: the count so far and
    the loss) after ``step`` completed: such a step is logged at the last step that completed."""
    return record["step"] == step and set(record) == {"step", "skipped_nonfinite", "loss"}
