"""Training checkpoints that can be trusted after days of training: complete or absent, verified on load.

Layout of one checkpoint (``root/checkpoint-00001000/``)::

    model.safetensors      one file per part: a dict of tensors -> <name>.safetensors,
    optimizer.pt           anything else (optimizer, LR scheduler, grad scaler, RNG, data position) -> <name>.pt
    metadata.json          the caller's metadata plus "step"
    COMPLETE               written last: JSON with every file's name, size and sha256

A save writes into ``root/.tmp-checkpoint-00001000-<random>/``, fsyncs every file and the folder, then renames it
to its final name, so a checkpoint folder either has its ``COMPLETE`` marker or was never finished. Only then does
retention (``keep_last``) delete older checkpoints, and only folders named ``checkpoint-<8 digits>`` directly in
``root`` (never symlinks, never anything else). ``.tmp-checkpoint-*`` leftovers of crashed saves are removed at
the next save; a root has one writer at a time (rank 0).

Re-saving an existing step swaps the two folders in one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere
the old folder is renamed aside first. Either way a complete checkpoint of that step exists at every moment, and a
crash between the two renames is undone by :func:`recover_checkpoints` (run before every save and every resume),
which puts a complete ``.tmp-checkpoint-*`` folder back under its final name instead of deleting it.

``.pt`` parts are read back with ``torch.load(weights_only=True)``, which accepts tensors, plain Python containers
and scalars, ``torch.Size``/``dtype``/``device`` and nothing else. Optimizer, LR scheduler (with its lambdas
dropped, as ``state_dict`` does) and ``GradScaler`` state dicts pass as they are; numpy arrays and scalars are
converted on save (arrays to tensors tagged with their dtype, scalars to Python numbers) and arrays come back as
numpy on load. Any other object is refused at save time, before anything is written, with the key path at fault.

The files inside a folder are written and read by :mod:`lvdm.training.checkpoint_files`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lvdm.errors import CheckpointError
from lvdm.fileio import probe_writable, umask
from lvdm.training.checkpoint_files import (
    CHECKPOINT_NAME,
    MARKER,
    MAX_STEP,
    METADATA,
    fsync_dir,
    human_size,
    not_a_folder,
    plan_parts,
    read_checkpoint_marker,
    read_metadata,
    read_pickle,
    read_safetensors,
    verify_file,
    write_file,
    write_json,
)

FORMAT = "lvdm-checkpoint"
TMP_PREFIX = ".tmp-checkpoint-"
_NEW_TEMP = re.compile(r"\.tmp-checkpoint-(\d{8})-\w+")  # a save in progress (complete once it has its marker)
_ASIDE = re.compile(r"\.tmp-checkpoint-checkpoint-(\d{8})-replaced-[0-9a-f]+")  # the old folder of a re-save


# --- names ----------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike) -> int:
    """The training step in a checkpoint folder's name (``checkpoint-00001000`` -> 1000)."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint folder (expected a name like checkpoint-00001000)")
    return int(match.group(1))


def _folder_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def _checkpoint_dirs(root: Path) -> Iterator[tuple[int, Path]]:
    """(step, path) of every real folder named ``checkpoint-<8 digits>`` directly in ``root`` (symlinks skipped)."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return
    except OSError as e:
        raise CheckpointError(f"cannot list checkpoint folder {root}: {e}") from e
    for entry in entries:
        match = CHECKPOINT_NAME.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            yield int(match.group(1)), root / entry.name


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``COMPLETE`` marker present) directly in ``root``, oldest step first."""
    found = [(step, path) for step, path in _checkpoint_dirs(Path(root)) if (path / MARKER).is_file()]
    return [path for _, path in sorted(found)]


def _latest(root: Path) -> Path | None:
    complete = list_checkpoints(root)
    newest = checkpoint_step(complete[-1]) if complete else -1
    unfinished = sorted(p for s, p in _checkpoint_dirs(root) if s > newest and not (p / MARKER).is_file())
    if unfinished:
        names = ", ".join(map(str, unfinished))
        warnings.warn(f"ignoring {names}: no {MARKER} marker (not a finished checkpoint)", stacklevel=3)
    return complete[-1] if complete else None


SELECTORS: dict[str, Callable[[Path], Path | None]] = {"latest": _latest}


def find_checkpoint(root: str | os.PathLike, which: str | os.PathLike = "latest") -> Path | None:
    """A checkpoint to resume from: a name in :data:`SELECTORS` (``"latest"``: newest complete one in ``root``,
    ``None`` if there is none) or a path to a checkpoint folder, returned as is if complete, else an error."""
    if isinstance(which, str) and which in SELECTORS:
        return SELECTORS[which](Path(root))
    path = Path(which)
    if not path.is_dir():
        choices = ", ".join(repr(name) for name in SELECTORS)
        raise CheckpointError(f"checkpoint {path} {not_a_folder(path)} (give a checkpoint folder or one of {choices})")
    if not (path / MARKER).is_file():
        if not (path / "metadata.json").exists():  # an exported decoder folder, a run folder, a user's folder
            raise CheckpointError(f"{path} is not a checkpoint folder (no {MARKER}, no metadata.json); give one of "
                                  "<output_dir>/checkpoints/checkpoint-<step>")  # fmt: skip
        raise CheckpointError(f"checkpoint {path} is incomplete: {path / MARKER} is missing (interrupted save?)")
    return path


# --- writing --------------------------------------------------------------------------------------------------------


def _write_all(folder: Path, plan: list[tuple[str, Callable[[Path, Any], None], Any]], meta: dict[str, Any]) -> None:
    records = [write_file(folder, name, writer, value) for name, writer, value in plan]
    records.append(write_file(folder, METADATA, write_json, meta))
    marker = {"format": FORMAT, "version": 1, "step": meta["step"], "files": records}
    write_file(folder, MARKER, write_json, marker)
    fsync_dir(folder)


def recover_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Put complete checkpoints left under temporary names by a crash back in place; returns what was recovered.

    A ``.tmp-checkpoint-<step>-*`` folder of a save that wrote its marker, or the ``-replaced-`` folder of a
    re-save killed between its two renames, is renamed to ``checkpoint-<step>`` when that name is free (the new
    save preferred over the replaced one). Folders being deleted by retention are never brought back.
    """
    root = Path(root)
    candidates: dict[int, list[tuple[int, Path]]] = {}
    for name in _entries(root):
        for rank, pattern in ((0, _NEW_TEMP), (1, _ASIDE)):
            match = pattern.fullmatch(name)
            path = root / name
            if match and path.is_dir() and not path.is_symlink() and _looks_complete(path, int(match.group(1))):
                candidates.setdefault(int(match.group(1)), []).append((rank, path))
    recovered = []
    for step, found in sorted(candidates.items()):
        final = root / _folder_name(step)
        if final.exists() or final.is_symlink():
            continue
        os.rename(min(found)[1], final)
        fsync_dir(root)
        recovered.append(final)
    return recovered


def _entries(root: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(root))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CheckpointError(f"cannot list checkpoint folder {root}: {e}") from e


def _looks_complete(path: Path, step: int) -> bool:
    """A readable marker for ``step`` whose files are all there with their sizes (hashes are checked on load)."""
    try:
        records = read_checkpoint_marker(path)
        marker_step = json.loads((path / MARKER).read_text(encoding="utf-8")).get("step")
        sizes_ok = all((path / r["name"]).stat().st_size == r["size"] for r in records)
    except (CheckpointError, OSError, ValueError, AttributeError):
        return False
    return sizes_ok and marker_step == step


def checkpoint_material(root: str | os.PathLike) -> list[Path]:
    """Everything in ``root`` that is or may become a checkpoint: complete, unfinished or temporary folders."""
    root = Path(root)
    return [root / name for name in _entries(root) if CHECKPOINT_NAME.fullmatch(name) or name.startswith(TMP_PREFIX)]


def _remove_leftovers(root: Path) -> None:
    """Recover complete temporary folders, then delete the other ``.tmp-checkpoint-*`` folders a killed save or
    retention left: named as lvdm names them and holding only files a save writes. Anything else under such a
    name (a user's notes, a link, a folder) is left, with a warning."""
    recover_checkpoints(root)
    for entry in os.scandir(root):
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        if _left_by_a_save(root / entry.name):
            shutil.rmtree(root / entry.name, ignore_errors=True)
        else:
            warnings.warn(f"{root / entry.name} is not a save lvdm left (it holds what a save does not write): "
                          "left as it is", stacklevel=2)  # fmt: skip


SAVE_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # safetensors' own temporary file, beside the file it writes
_DOOMED = re.compile(r"\.tmp-checkpoint-checkpoint-\d{8}-deleting-[0-9a-f]+")  # retention's, killed mid-delete


def _left_by_a_save(folder: Path) -> bool:
    if not any(pattern.fullmatch(folder.name) for pattern in (_NEW_TEMP, _ASIDE, _DOOMED)):
        return False
    return all(entry.is_file(follow_symlinks=False) and bool(OUR_FILE.fullmatch(entry.name) or
               SAVE_TEMP.fullmatch(entry.name)) for entry in os.scandir(folder))  # fmt: skip


def _new_temp(root: Path, step: int) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        temp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step:08d}-", dir=root))
        os.chmod(temp, 0o777 & ~umask())  # mkdtemp makes it 0700: a checkpoint gets the user's usual mode
        return temp
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {root}: {e}") from e


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # an old kernel or a file system without it: rename aside instead
    raise OSError(code, os.strerror(code), str(b))


def _move_into_place(temp: Path, final: Path) -> None:
    """Rename ``temp`` to ``final``; an existing ``final`` is swapped with it atomically where the OS can (else
    renamed aside first, which :func:`recover_checkpoints` undoes after a crash) and deleted after."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CheckpointError(f"{final} exists and is not a checkpoint folder; refusing to replace it")
    if final.exists() and (foreign := _unlisted(final)):
        raise CheckpointError(f"{final} holds what lvdm did not write there ({foreign}); refusing to replace it")
    if final.exists() and _exchange(temp, final):
        fsync_dir(final.parent)
        shutil.rmtree(temp, ignore_errors=True)  # now holds the old checkpoint
        return
    aside = None
    if final.exists():
        aside = final.parent / f"{TMP_PREFIX}{final.name}-replaced-{secrets.token_hex(4)}"
        os.rename(final, aside)
    try:
        os.rename(temp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)  # put the old one back
        raise
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _metadata(step: int, metadata: dict[str, Any] | None) -> dict[str, Any]:
    meta = dict(metadata or {})
    if meta.setdefault("step", step) != step:
        raise ValueError(f"metadata['step'] = {meta['step']!r} disagrees with step={step}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint metadata must be JSON-serializable: {e}") from e
    return meta


def _check_arguments(step: int, keep_last: int | None) -> None:
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an int in [0, {MAX_STEP}], got {step!r}")
    if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
        raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    parts: dict[str, Any],
    *,
    keep_last: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/checkpoint-{step:08d}`` atomically (see the module docstring) and return its path.

    ``parts`` maps a name to a ``dict[str, Tensor]`` (``<name>.safetensors``) or any weights_only-safe state
    (``<name>.pt``). A re-save of the same step replaces the old folder. After the new checkpoint is in place,
    ``keep_last`` keeps it plus the ``keep_last - 1`` newest other complete checkpoints and deletes the rest.
    A failed write is a :class:`CheckpointError` naming the file and the OS error; nothing else is touched.
    """
    _check_arguments(step, keep_last)
    plan, meta = plan_parts(parts), _metadata(step, metadata)
    root = Path(root)
    final = root / _folder_name(step)
    temp = _new_temp(root, step)
    try:
        _write_all(temp, plan, meta)
        _move_into_place(temp, final)
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, OSError):
            raise CheckpointError(f"could not put checkpoint {final} in place: {error}") from error
        raise
    if keep_last is not None:
        _prune(root, keep_last, final)
    return final


def _prune(root: Path, keep_last: int, new: Path) -> None:
    """Delete the oldest complete checkpoints in ``root`` so that ``new`` and ``keep_last - 1`` others remain."""
    others = [path for path in list_checkpoints(root) if path.name != new.name]
    for path in others[: max(0, len(others) - (keep_last - 1))]:
        if path.parent != root or path.is_symlink() or not CHECKPOINT_NAME.fullmatch(path.name):
            continue  # defensive: list_checkpoints only yields real folders directly in root
        if foreign := _unlisted(path):
            warnings.warn(f"kept old checkpoint {path} (keep_last): it holds what lvdm did not write there "
                          f"({foreign}); delete it yourself", stacklevel=3)  # fmt: skip
            continue
        doomed = root / f"{TMP_PREFIX}{path.name}-deleting-{secrets.token_hex(4)}"
        try:
            os.rename(path, doomed)  # gone from the listing at once; a crash leaves a .tmp leftover
            shutil.rmtree(doomed)
        except OSError as e:
            warnings.warn(f"could not delete old checkpoint {path}: {e}", stacklevel=3)


OUR_FILE = re.compile(  # the names of the files lvdm writes into a checkpoint folder
    r"[A-Za-z0-9][A-Za-z0-9_-]*\.(safetensors|pt)|metadata\.json|" + MARKER
)


def _unlisted(folder: Path) -> str:
    """The entries of a checkpoint folder that its ``COMPLETE`` does not list as files (a user's, put there), named
    (the first few) or ``""``. Where the marker is unreadable (damaged), files are judged by lvdm's names for them."""
    try:
        listed = {MARKER} | {record["name"] for record in read_checkpoint_marker(folder)}
        ours = listed.__contains__
    except CheckpointError:
        ours = OUR_FILE.fullmatch
    try:
        entries = _entries(folder)
    except CheckpointError:
        return "an unreadable listing"
    foreign = [name for name in entries if not ours(name) or not (folder / name).is_file() or
               (folder / name).is_symlink()]  # fmt: skip
    return ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")


# --- reading --------------------------------------------------------------------------------------------------------


READERS: dict[str, Callable[[Path], Any]] = {".safetensors": read_safetensors, ".pt": read_pickle}


def _read_part(file: Path) -> Any:
    if file.suffix not in READERS:
        raise CheckpointError(f"{file}: unknown part format {file.suffix!r} (expected one of {sorted(READERS)})")
    try:
        return READERS[file.suffix](file)
    except CheckpointError:
        raise
    except Exception as e:  # weights_only refusal (UnpicklingError), corrupt zip or header: all name the file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: cannot be loaded safely ({type(e).__name__}: {first_line})") from e


_VERIFIED: dict[Path, tuple[tuple[str, int, int], ...]] = {}  # folder -> (name, size, mtime) of files hashed ok


def _fingerprint(path: Path, records: list[dict[str, Any]]) -> tuple[tuple[str, int, int], ...]:
    stats = [(name, (path / name).stat()) for name in [MARKER] + [r["name"] for r in records]]
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint's marker, every file's size and sha256 and its metadata; returns the metadata.

    A folder verified once in this process is not hashed again while its files keep their sizes and mtimes.
    """
    path = Path(path)
    records = read_checkpoint_marker(path)
    try:
        fingerprint = _fingerprint(path, records)
    except OSError:
        fingerprint = None
    if fingerprint is None or _VERIFIED.get(path.resolve()) != fingerprint:
        for record in records:
            verify_file(path, record)
        if fingerprint is not None:
            _VERIFIED[path.resolve()] = fingerprint
    return read_metadata(path)


def load_part(path: str | os.PathLike, name: str) -> Any:
    """One part of a verified checkpoint (``None`` when it has no part of that name)."""
    path = Path(path)
    verify_checkpoint(path)
    for record in read_checkpoint_marker(path):
        file = path / record["name"]
        if record["name"] != METADATA and file.name.removesuffix(file.suffix) == name:
            return _read_part(file)
    return None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(parts, metadata)`` of a complete checkpoint, on the CPU, after checking every file's size and sha256.

    A missing marker, a missing or corrupt file, metadata that is not an object with the folder's step, or a
    ``.pt`` part that ``torch.load(weights_only=True)`` refuses is a :class:`CheckpointError` naming the file;
    nothing is returned half-loaded.
    """
    path = Path(path)
    metadata = verify_checkpoint(path)
    parts = {}
    for record in read_checkpoint_marker(path):
        if record["name"] != METADATA:
            file = path / record["name"]
            parts[file.name.removesuffix(file.suffix)] = _read_part(file)
    return parts, metadata


# --- before training ------------------------------------------------------------------------------------------------


def check_writable(root: str | os.PathLike, *, min_free_bytes: int = 0) -> None:
    """Create ``root`` if needed and write, fsync and delete a probe file there; a :class:`CheckpointError` naming
    ``root`` if that fails or if less than ``min_free_bytes`` are free. Call it before loading any model."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} is a file, not a folder: give a folder (a new one, or one of lvdm's runs)")
    if root.is_symlink() and not root.exists():  # mkdir said "File exists"
        raise CheckpointError(f"{root} is a link to {os.readlink(root)}, which does not exist: make that folder first")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe_writable(root)
        free = shutil.disk_usage(root).free
    except OSError as e:
        raise CheckpointError(f"folder {root} is not writable: {e.strerror or e}") from e
    if free < min_free_bytes:
        raise CheckpointError(
            f"checkpoint folder {root} has {human_size(free)} free, less than the {human_size(min_free_bytes)} needed"
        )
