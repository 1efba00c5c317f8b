"""Writing a file so that readers only ever see the old version or the complete new one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from lvdm.errors import ConfigError, OutputWriteError

NAME_MAX = 255  # bytes in one file name: Linux's ext4/xfs/btrfs, macOS's APFS and Windows' NTFS (in characters)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, exclusive: bool = False) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` on success, deleted on failure.

    A write that fails for lack of space or permission (an ``OSError``, or safetensors' I/O error) becomes one
    :class:`~lvdm.errors.OutputWriteError` naming ``path``; the old ``path`` is left as it was. ``exclusive``: a
    ``path`` that exists by then (another run wrote it meanwhile) is an error and is left as it is, never replaced.
    """
    with atomic_paths([path], exclusive=exclusive) as (temp,):
        yield temp


@contextlib.contextmanager
def atomic_paths(
    paths: list[str | os.PathLike], *, exclusive: bool = False, keep_suffix: bool = False
) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that go together (a module and the LoRA beside it): a temporary name beside
    each to write to, all renamed into place only once every one is written, so a failure part-way leaves every
    ``path`` as it was, a replaced one too. ``exclusive``: one that exists by the time they are placed undoes
    the others placed (files this call made, checked to be unchanged) and is left as it is. ``keep_suffix``: the
    temporary names end in their path's suffix too (for writers that check it)."""
    paths = [Path(path) for path in paths]
    temps = [_temp_name(path, path.suffix if keep_suffix else "") for path in paths]
    placed: list[tuple[Path, os.stat_result]] = []
    current = paths[0]
    for path in paths:
        _make_folder(path)
    try:
        try:
            yield temps
        except OutputWriteError as exc:  # a writer's own atomic write, to a temporary name: named as the output
            message = str(exc)
            for temp, path in zip(temps, paths, strict=True):
                message = message.replace(str(temp), str(path))
            raise OutputWriteError(message) from exc
        except (OSError, SafetensorError) as exc:  # named by the output whose temporary name it names
            filename = str(getattr(exc, "filename", None))
            named = [path for temp, path in zip(temps, paths, strict=True) if str(temp) == filename]
            current = named[0] if named else current
            raise
        for path, temp in zip(paths, temps, strict=True):
            current = path  # named by a failure
            if path.is_dir() and not path.is_symlink():  # before any is placed: replacing it would fail part-way
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            os.chmod(temp, 0o666 & ~umask())  # safetensors writes 0600: lvdm's files get the user's usual mode
        for temp, current in zip(temps, paths, strict=True):
            if exclusive:
                _place(temp, current)
                placed.append((current, os.stat(current, follow_symlinks=False)))
            else:
                os.replace(temp, current)
    except BaseException as exc:
        for path, stamp in placed:  # all or nothing: only what this call placed, if still as it placed it
            if same_file(path, stamp):
                with contextlib.suppress(OSError):
                    path.unlink()
        own = isinstance(exc, OutputWriteError)  # already one line naming the output (an OSError too)
        failure = write_failure(current, exc) if isinstance(exc, (OSError, SafetensorError)) and not own else exc
        if failure is exc:
            raise
        raise failure from exc
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):  # never made (its folder could not be), or already renamed
                temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to write into, renamed to ``path`` (a new name, or an empty folder) on
    success with the user's usual modes, deleted on failure. Failures are :func:`atomic_path`'s one-line errors:
    no space, a file put into ``path`` meanwhile (left as it is), a ``path`` that cannot be replaced (a mount
    point, the working folder)."""
    path = Path(path)
    _make_folder(path)
    try:
        temp = Path(tempfile.mkdtemp(prefix=f".{path.name.encode()[:200].decode(errors='ignore')}.", dir=path.parent))
    except OSError as exc:
        raise write_failure(path, exc) from exc
    try:
        yield temp
        mask = umask()
        for item in [temp, *temp.rglob("*")]:  # mkdtemp makes 0700 and safetensors 0600
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
        os.replace(temp, path)
    except (OSError, SafetensorError) as exc:
        failure = exc if isinstance(exc, OutputWriteError) else write_failure(path, exc)
        if failure is exc:
            raise
        raise failure from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # the folder made above, unless it was renamed into place


def _make_folder(path: Path) -> None:
    """The folder of ``path``, made if needed; one that cannot be (a file in the way, no permission) is one
    :class:`~lvdm.errors.OutputWriteError` saying why (a file in the way was "exists ... --overwrite")."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = nearest_existing(path.parent)
        reason = f"{blocker} is not a folder" if not blocker.is_dir() else exc.strerror or str(exc)
        raise OutputWriteError(f"could not write {path}: its folder cannot be made ({reason})") from exc


def _temp_name(path: Path, suffix: str = "") -> Path:
    """``.{name}.{8 hex}.tmp{suffix}``, the name shortened so that it fits where ``path`` fits, with room for the
    ``.d`` of :func:`save_safetensors`' folder."""
    name, limit = os.fsencode(path.name), NAME_MAX - 16 - len(os.fsencode(suffix))
    stem = path.name if len(name) <= limit else name[:limit].decode(errors="ignore")  # a name's bytes: not UTF-8 too
    return path.with_name(f".{stem}.{secrets.token_hex(4)}.tmp{suffix}")


def write_failure(path: Path, exc: OSError | SafetensorError) -> OutputWriteError | BaseException:
    """The one-line :class:`~lvdm.errors.OutputWriteError` for a failed write of ``path`` (an output found there
    meanwhile, no space, no permission, safetensors' I/O error); another error as it is."""
    if isinstance(exc, FileExistsError) or getattr(exc, "errno", None) == errno.ENOTEMPTY:
        return OutputWriteError(
            f"{path} exists (it was there before, or another run wrote it while lvdm was writing); it is left as it "
            "is: choose another output, or overwrite it (--overwrite, overwrite=True)"
        )
    if isinstance(exc, OSError):
        return _write_error(path, exc.strerror or str(exc))
    if "I/O error" not in str(exc):
        return exc
    return _write_error(path, str(exc).split("I/O error:")[-1].strip())


def same_file(path: Path, stamp: os.stat_result) -> bool:
    """Whether ``path`` is still the file ``stamp`` was taken of, unchanged (device, inode, size, mtime)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (
        stamp.st_dev, stamp.st_ino, stamp.st_size, stamp.st_mtime_ns)  # fmt: skip


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it: a race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # no /proc (macOS, old kernels): read it by setting it, briefly to the strictest
    os.umask(mask)
    return mask


def _place(temp: Path, path: Path) -> None:
    """``temp`` renamed to ``path`` only if ``path`` does not exist, in one step: a hard link (FileExistsError
    if it does), or, where the file system has none, an exclusive create of ``path`` that the rename then fills."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network file systems)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        made = os.fstat(fd)
        os.close(fd)
        try:
            os.replace(temp, path)
        except OSError:  # the empty placeholder this made would be left where the output goes, blocking a retry
            if same_file(path, made):
                os.unlink(path)
            raise


def _write_error(path: Path, reason: str) -> OutputWriteError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return OutputWriteError(f"could not write {path}: {reason} ({free}); any previous version is unchanged")


def read_bounded(path: str | os.PathLike, limit: int, *, regular_only: bool = False) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them (more is an ``OSError`` saying so, not a read into memory:
    ``/dev/zero``). ``regular_only``: a FIFO or a device is refused, for files that only ever are regular ones
    (captions); otherwise a pipe (``<(...)``) is read like a file. Nothing waits for a writer that may never come:
    a FIFO that no process holds open for writing is an ``OSError`` (a blocking open would wait forever)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):  # reading it failed naming the descriptor ("Is a directory: 3")
            raise OSError(errno.EISDIR, "a folder, not a file")
        if regular_only and not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {_size(limit)}")
        data = _first_bytes(fd, limit + 1) if stat.S_ISFIFO(info.st_mode) else b""
        if hasattr(os, "O_NONBLOCK"):  # (not on Windows, where nothing was opened without blocking)
            os.set_blocking(fd, True)  # a pipe's writer may be slower than this reader: wait for its bytes, then EOF
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data += handle.read(limit + 1 - len(data))
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {_size(limit)}")
        return data
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, limit: int = 1 << 20) -> Any:
    """The JSON value in ``path``, a regular file of at most ``limit`` bytes: an ``OSError`` when it cannot be read
    so (a FIFO, a folder, too large), a ``ValueError`` when it is not UTF-8 JSON (nested too deep included)."""
    data = read_bounded(path, limit, regular_only=True)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def _first_bytes(fd: int, count: int) -> bytes:
    """What a FIFO opened without blocking holds now; none and no writer is an error rather than an empty file."""
    try:
        data = os.read(fd, count)
    except BlockingIOError:  # a writer holds it open and has not written yet: the blocking read waits for it
        return b""
    if not data:
        raise OSError(errno.ENXIO, "a pipe that no process writes to (or one that ended without output)")
    return data


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"


def json_text(data: Any, **options: Any) -> str:
    """``json.dumps(data, ensure_ascii=False)``, readable UTF-8, except that a string UTF-8 cannot hold (a file name
    that is not UTF-8 reaches Python with lone surrogates) makes the whole text ASCII, ``\\udcff`` escaped."""
    text = json.dumps(data, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, **options)
    return text


def is_stray_temp(name: str, final_names: tuple[str, ...]) -> bool:
    """Whether ``name`` is a leftover of an :func:`atomic_path` write to one of ``final_names`` that was killed (a
    file, or the folder of :func:`save_safetensors`), or of a writer's own atomic write to such a temporary name
    (a run's module, written inside :func:`atomic_paths` with the LoRA beside it)."""
    for final in final_names:
        prefix = f".{final}."
        tmp = (".tmp", ".tmp" + Path(final).suffix)  # atomic_paths(keep_suffix=True) keeps the suffix
        for end in (*tmp, *(t + SAFETENSORS_FOLDER for t in tmp)):
            middle = name[len(prefix) : -len(end)] if name.startswith(prefix) and name.endswith(end) else ""
            if len(middle) == 8 and all(c in "0123456789abcdef" for c in middle):
                return True
    inner = _WRITE_TO.fullmatch(name)
    return bool(inner) and is_stray_temp(inner[1], final_names)


_WRITE_TO = re.compile(r"\.(\..+)\.[0-9a-f]{8}\.tmp.*")  # an atomic write's name for a target that is one itself


SAFETENSORS_FOLDER, _WRITTEN = ".d", "tensors.safetensors"


def save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` to ``path`` (an :func:`atomic_path` temporary name), its own temporary file
    kept in a folder of lvdm's: safetensors (0.8) writes ``.tmp`` and six random characters beside its target,
    then renames it, and what a kill -9 leaves there lvdm could not tell from a user's file. A killed write leaves
    ``{path}.d/``, which :func:`is_stray_temp` knows by its name and :func:`remove_stray_temp` removes."""
    from safetensors.torch import save_file

    path = Path(path)
    folder = path.with_name(path.name + SAFETENSORS_FOLDER)
    folder.mkdir()  # new: what is in it is this call's writing
    try:
        save_file(tensors, folder / _WRITTEN, metadata=metadata)
        os.replace(folder / _WRITTEN, path)
    finally:
        remove_stray_temp(folder)


def remove_stray_temp(path: Path) -> None:
    """Remove an :func:`is_stray_temp` leftover: a file, or a :func:`save_safetensors` folder with what safetensors
    writes in it (anything else is left, and the folder with it)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    if not path.name.endswith(SAFETENSORS_FOLDER):  # a folder by a file's temporary name: not lvdm's
        return
    for entry in path.iterdir():
        if (entry.name == _WRITTEN or entry.name.startswith(".tmp")) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: something lvdm did not write
        path.rmdir()


WRITE_PROBE, _PROBE_TEXT = ".write-probe-", b"lvdm write probe\n"
_PROBE_NAME = re.compile(re.escape(WRITE_PROBE) + r"[a-z0-9_]{8}")  # mkstemp's 8 characters after the prefix


def probe_writable(folder: Path) -> None:
    """Write, fsync and delete a probe file (``.write-probe-1a2b3c4d``) in ``folder``; the ``OSError`` if it fails.
    A kill leaves it, which :func:`remove_write_probes` knows by its name and text."""
    fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE, dir=folder)
    try:
        os.write(fd, _PROBE_TEXT)
        os.fsync(fd)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile by the run that holds the folder's lock
            os.unlink(probe)


def write_problem(folder: Path) -> str | None:
    """Why no file can be written in ``folder`` (``"Not a directory"``, ``"Permission denied"`` ...), found by
    :func:`probe_writable`; None when one can. ``os.access`` would say yes to root anywhere, /proc included. Probes
    an earlier, killed check left there go first (:func:`remove_write_probes`: lvdm's by name and text)."""
    remove_write_probes(folder)
    try:
        probe_writable(folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def is_write_probe(path: Path) -> bool:
    """Whether ``path`` is a probe file a killed :func:`probe_writable` left: a regular file of its name holding the
    start of its text (a file of yours that only starts with ``.write-probe-`` is not)."""
    if not _PROBE_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_file():
        return False
    try:
        return _PROBE_TEXT.startswith(read_bounded(path, len(_PROBE_TEXT), regular_only=True))
    except OSError:
        return False


def remove_write_probes(folder: Path) -> None:
    """Delete the :func:`is_write_probe` files in ``folder``, nothing else; none where it cannot be listed or written
    (the start-up check then names the folder)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if _PROBE_NAME.fullmatch(name) and is_write_probe(folder / name):
                (folder / name).unlink()


def undeletable(path: Path) -> tuple[Path, str] | None:
    """Where ``shutil.rmtree(path)`` would stop part-way and why: the first folder in it (``path`` too) that cannot
    be listed, or that holds something and is not writable; None for a tree that can go (an empty folder needs only
    its parent writable) and for a file or link (its folder decides)."""
    failed: list[OSError] = []
    for parent, dirs, files in os.walk(path, onerror=failed.append) if path.is_dir() and not path.is_symlink() else ():
        if (dirs or files) and not os.access(parent, os.W_OK | os.X_OK):
            return Path(parent), "is not writable"
    return (Path(failed[0].filename), f"cannot be listed ({failed[0].strerror})") if failed else None


def first_missing(path: str | os.PathLike) -> Path | None:
    """The highest folder of ``path`` (made absolute) that is not there, which making ``path`` would make; None when
    ``path`` is there (a link counts)."""
    path = Path(path).absolute()
    existing = nearest_existing(path)
    return None if existing == path else existing / path.relative_to(existing).parts[0]


def remove_made_folders(path: str | os.PathLike, top: Path) -> None:
    """``rmdir`` ``path`` and its parents up to ``top`` (the highest one this process made, :func:`first_missing`),
    stopping at the first that is not empty: a folder with anything in it stays."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == top:
            return


def control_character(text: str) -> str | None:
    """The first control character in ``text`` (a newline splits every message and listing that names a file)."""
    return next((c for c in text if ord(c) < 32 or ord(c) == 127), None)


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` (made absolute) or its nearest ancestor that is there; a link counts, even one that dangles: it is
    what a folder would have to be made over."""
    probe = Path(path).absolute()
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    return probe


def resolved_path(path: str | os.PathLike) -> Path | None:
    """``path`` with ``~`` and every link resolved (those that dangle too), or None where links loop."""
    try:
        return Path(path).expanduser().resolve()
    except FileNotFoundError:  # os.getcwd(): a relative path in a working folder deleted meanwhile
        raise ConfigError(f"{os.fspath(path)!r} is relative to the working folder, which no longer exists") from None
    except (RuntimeError, OSError):  # "Symlink loop" (RuntimeError before Python 3.13), ELOOP
        return None


def special_folder(path: str | os.PathLike) -> str | None:
    """Why ``path`` may never be a run folder (``/``, a file-system root or mount point, the home folder or a
    folder above it, a folder in ``/proc`` or ``/sys``), or None."""
    resolved = resolved_path(path)
    if resolved is None:
        return "a link that loops"
    home = Path.home().resolve()
    if resolved == home:
        return "your home folder"
    if resolved == Path(resolved.anchor) or os.path.ismount(resolved):
        return "a file-system root"
    if home.is_relative_to(resolved):
        return "a folder above your home folder"
    for kernel in (Path("/proc"), Path("/sys")):  # procfs, sysfs: no file can be made there ("No such file")
        if resolved.is_relative_to(kernel):
            return f"inside {kernel}, the kernel's own file system, where no file can be made"
    return None


def open_error(path: str | os.PathLike) -> OSError | None:
    """The error opening ``path`` for reading raises (permission denied, ...), or None; a FIFO is opened without
    waiting for a writer. safetensors reports a file the user may not read as missing: this tells the two apart."""
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))
    except OSError as exc:
        return exc
    return None


def unreadable(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be opened for reading ("Permission denied", ...), or None (:func:`open_error`)."""
    error = open_error(path)
    return None if error is None else error.strerror or type(error).__name__


def safetensors_handle(path: str | os.PathLike) -> Any:
    """``safe_open(path)``; a file that cannot be opened raises the :class:`OSError` that says why, naming it
    (safetensors' own says "No such file or directory" for a file the user may not read)."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception:
        error = open_error(path)
        if error is not None:
            raise error from None
        raise
