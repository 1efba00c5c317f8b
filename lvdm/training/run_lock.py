"""One run at a time in a run folder: the run lock, and the run marker's reading and writing.

Rank 0 takes an exclusive ``flock`` on ``output_dir/.lvdm-lock`` (:func:`lock_run`) before it touches the folder
and holds it until :func:`release_run` or process exit. The run marker ``.lvdm-run.json`` lists the names lvdm
writes there (:data:`lvdm.training.run_dir.RUN_FILES`, ``RUN_FOLDERS``), never what else appears while a run holds
the folder: a file a user puts there mid-run is theirs, and a later ``train.overwrite`` refuses it. What lvdm may
write, delete and resume there is in :mod:`lvdm.training.run_dir`.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from lvdm.errors import LvdmError
from lvdm.fileio import atomic_path, read_json, remove_made_folders

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected from each other there
    fcntl = None  # type: ignore[assignment]

RUN_MARKER = ".lvdm-run.json"
LOCK_FILE = ".lvdm-lock"


def notice(message: str) -> None:
    """One line on stderr for the user, from rank 0 only (not a Python warning: nothing is wrong)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", file=sys.stderr, flush=True)


def run_entries(output_dir: Path, *, everything: bool = False) -> list[str]:
    """The sorted names in ``output_dir`` ([] when it is missing), lvdm's run marker and lock file left out unless
    ``everything``."""
    try:
        names = sorted(os.listdir(output_dir))
    except FileNotFoundError:
        return []
    return names if everything else [n for n in names if n not in (RUN_MARKER, LOCK_FILE)]


# ------------------------------------------------------------------------------------ what the run wrote


def read_run_marker(output_dir: Path) -> dict[str, Any] | None:
    """The run marker, or None (missing, or not lvdm's JSON: nested too deep too). A link, folder or pipe by its
    name is refused, not read: a FIFO would wait forever for a writer."""
    path = output_dir / RUN_MARKER
    kind = _not_a_file(path)
    if kind:
        raise LvdmError(f"{path} is {kind}, not lvdm's run marker; move it away or choose another output_dir")
    try:
        marker = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return None
    return marker


def write_run_marker(output_dir: Path, marker: dict[str, Any]) -> None:
    """Replace the run marker with ``marker``, atomically."""
    with atomic_path(output_dir / RUN_MARKER) as temp:
        temp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive ``flock`` on ``output_dir/.lvdm-lock``; the file names the holder while it is held.

    The OS releases the lock when the process dies, however it dies; a lock file still naming a holder when the
    lock is free was left by a killed run, which is reported and taken over.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.path = output_dir / LOCK_FILE
        self.fd: int | None = None
        self.created = False
        self.made_folder: Path | None = None  # the highest folder the caller made for ``output_dir`` (first_missing)

    def acquire(self) -> None:
        if fcntl is None:
            return
        fd, self.created = _open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise LvdmError(
                f"output_dir {self.output_dir} is in use by another lvdm run ({holder}); "
                "wait for it to finish or stop it, or choose another output_dir"
            ) from None
        previous = _read_holder(fd)
        if previous is None and os.fstat(fd).st_size:  # neither empty nor a holder: a file of the user's by that name
            os.close(fd)
            raise _not_lvdm_lock(self.path, "a file holding something else")
        if previous:
            notice(f"the previous run in {self.output_dir} ({_describe(previous)}) did not exit cleanly; taking over")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd

    def release(self, *, refused: bool = False) -> None:
        """Mark a clean exit (empty lock file) and unlock. A refused run leaves no lock file behind if it created
        it, and no folder if it made the folder and wrote nothing in it but its marker (removed under the lock)."""
        if self.fd is None:
            return
        try:
            if refused and self.created:
                self.path.unlink(missing_ok=True)
                if self.made_folder is not None and run_entries(self.output_dir, everything=True) == [RUN_MARKER]:
                    (self.output_dir / RUN_MARKER).unlink()
            os.ftruncate(self.fd, 0)
        except OSError:
            pass  # a full disk at exit: the lock is released anyway; the next run reports it as not clean
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if refused and self.made_folder is not None:  # rmdir removes only empty folders: another run's files stay
            remove_made_folders(self.output_dir, self.made_folder)


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """``path`` opened for reading and writing, made if missing, and whether this call made it. Never through a
    link, and only a regular file with no other name: lvdm truncates and writes its lock file, and anything else
    there (a link to a user's file, a hard link, a folder, a FIFO) is not its to change."""
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO: no wait for a peer
    try:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:  # a dangling link too: O_EXCL does not follow it
            fd = os.open(path, flags)
    except OSError as exc:
        kind = _not_a_file(path)
        if kind:
            raise _not_lvdm_lock(path, kind) from None
        raise LvdmError(f"cannot open the run lock {path}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    kind = _kind(info.st_mode) or ("a hard link to a file of another name" if info.st_nlink != 1 else None)
    if kind:
        os.close(fd)
        raise _not_lvdm_lock(path, kind)
    return fd, False


def _not_a_file(path: Path) -> str | None:
    """What ``path`` is when it is there but not a regular file ("a link", "a folder", ...), else None."""
    try:
        return _kind(os.lstat(path).st_mode)
    except OSError:
        return None


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return "a link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "a pipe, socket or device"


def _not_lvdm_lock(path: Path, kind: str) -> LvdmError:
    return LvdmError(
        f"{path} is {kind}, not lvdm's lock file; lvdm neither writes through it nor removes it: move it away or "
        "choose another output_dir"
    )


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError, RecursionError):  # 4096 bytes nest deeper than Python's recursion limit
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    pid, host = holder.get("pid"), holder.get("host")
    state = ""
    if host == socket.gethostname() and isinstance(pid, int):
        state = ", still running" if _alive(pid) else ", no longer running"
    return f"pid {pid} on {host}, started {holder.get('started')}{state}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


_HELD: dict[Path, RunLock] = {}


def lock_run(output_dir: Path) -> RunLock:
    """Take (or, in the same process, reuse) the lock of ``output_dir``; held until :func:`release_run` or exit."""
    key = output_dir.resolve()
    if key not in _HELD:
        lock = RunLock(output_dir)
        lock.acquire()
        _HELD[key] = lock
    return _HELD[key]


def release_run(output_dir: Path, *, refused: bool = False, failed: bool = False) -> None:
    """Release this process's lock on ``output_dir``. ``failed``: the run ended in an error; it counts as refused
    if it made the folder and wrote nothing in it but its marker."""
    lock = _HELD.pop(Path(output_dir).resolve(), None)
    if lock is not None:
        if failed:
            refused = lock.made_folder is not None and not run_entries(lock.output_dir)
        lock.release(refused=refused)


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release_run(key)
