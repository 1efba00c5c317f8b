"""The files inside one checkpoint folder: each written, fsynced and recorded, and each read back and checked.

:mod:`lvdm.training.checkpoint` makes folders of them (layout, atomic saves, retention, recovery, loading). Here
are the pieces it uses: values made weights_only-safe (numpy arrays to tagged tensors and back, any other object
refused with its key path), a writer and a reader per part format (``.safetensors``, ``.pt``), the ``{"name",
"size", "sha256"}`` record of every file written, and the checks of the ``COMPLETE`` marker, of each file against
its record and of ``metadata.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from lvdm.errors import CheckpointError
from lvdm.fileio import read_json, umask

MARKER = "COMPLETE"
METADATA = "metadata.json"
MAX_STEP = 10**8 - 1  # the folder name holds 8 digits
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{8})")  # a checkpoint folder's name; group 1 is its step
_PART_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_NDARRAY = "__lvdm_ndarray__"  # tag of an encoded numpy array: {_NDARRAY: tensor, "dtype": "<u4"}
_LEAF_TYPES = (bool, int, float, complex, str, bytes, bytearray, type(None), torch.dtype, torch.device, torch.Size)
_CHUNK = 1 << 20


# --- weights_only-safe values ---------------------------------------------------------------------------------------


def _encode(value: Any, where: str) -> Any:
    """``value`` with numpy converted, so that ``torch.load(weights_only=True)`` reads it; anything else refused."""
    if type(value) in _LEAF_TYPES or type(value) in (torch.Tensor, torch.nn.Parameter):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return {_NDARRAY: torch.from_numpy(np.array(value)), "dtype": value.dtype.str}
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return value.item()
    if type(value) in (dict, OrderedDict):
        for key in value:
            if type(key) not in _LEAF_TYPES:
                raise CheckpointError(f"{where}: key {key!r} of type {type(key).__name__} cannot be stored")
        return type(value)((k, _encode(v, f"{where}[{k!r}]")) for k, v in value.items())
    if type(value) in (list, tuple, set):
        return type(value)(_encode(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise CheckpointError(
        f"{where}: {type(value).__module__}.{type(value).__qualname__} cannot be stored "
        "(torch.load(weights_only=True) would refuse it); convert it to tensors, numbers, strings, lists or dicts"
    )


def _decode(value: Any, where: str) -> Any:
    """Undo :func:`_encode`: tagged tensors back to numpy arrays."""
    if type(value) in (dict, OrderedDict):
        if set(value) == {_NDARRAY, "dtype"}:
            return _decode_array(value, where)
        return type(value)((k, _decode(v, where)) for k, v in value.items())
    if type(value) in (list, tuple, set):
        return type(value)(_decode(v, where) for v in value)
    return value


def _decode_array(value: dict[str, Any], where: str) -> np.ndarray:
    tensor, dtype = value[_NDARRAY], value["dtype"]
    if not isinstance(tensor, torch.Tensor) or not isinstance(dtype, str) or np.dtype(dtype).kind not in "biufc":
        raise CheckpointError(f"{where}: malformed numpy array entry")
    return tensor.numpy().astype(np.dtype(dtype), copy=False)


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


# --- writing --------------------------------------------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Tensors moved to the CPU, made contiguous; a tensor sharing storage with an earlier one (tied) is copied."""
    seen: set[int] = set()
    plain = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        plain[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    safetensors.torch.save_file(plain, str(path))


def _write_pickle(path: Path, value: Any) -> None:
    with open(path, "wb") as f:
        torch.save(value, f)


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON with sorted keys: the writer of ``metadata.json`` and the marker."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def plan_parts(parts: dict[str, Any]) -> list[tuple[str, Callable[[Path, Any], None], Any]]:
    """(file name, writer, value) for every part, checked before anything is written."""
    plan = []
    for name, value in parts.items():
        if not isinstance(name, str) or not _PART_NAME.fullmatch(name):
            raise ValueError(f"part name {name!r}: use letters, digits, '_' and '-' (it becomes a file name)")
        if _is_tensor_dict(value):
            plan.append((f"{name}.safetensors", _write_safetensors, value))
        else:
            plan.append((f"{name}.pt", _write_pickle, _encode(value, f"part {name!r}")))
    return plan


def _sha256(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _sha256_and_sync(path: Path) -> dict[str, Any]:
    """{"name", "size", "sha256"} of a written file, which is fsynced on the way."""
    with open(path, "rb") as f:
        digest = _sha256(f)
        os.fsync(f.fileno())
        return {"name": path.name, "size": f.tell(), "sha256": digest}


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` durable (a no-op where folders cannot be fsynced: Windows)."""
    if os.name != "posix":
        return  # folders cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(folder: Path, name: str, writer: Callable[[Path, Any], None], value: Any) -> dict[str, Any]:
    """Write one file, returning its record; any failure is a CheckpointError naming the file."""
    path = folder / name
    try:
        writer(path, value)
        os.chmod(path, 0o666 & ~umask())  # safetensors writes 0600: the user's usual mode
        return _sha256_and_sync(path)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as RuntimeError
        if not folder.is_dir():  # someone removed the folder under us (a second writer on the same root?)
            raise CheckpointError(f"could not write {path}: its folder vanished while saving ({e})") from e
        free = shutil.disk_usage(folder).free
        raise CheckpointError(f"could not write {path}: {e} ({human_size(free)} free on that disk)") from e


def human_size(size: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def not_a_folder(path: Path) -> str:
    """Why ``path``, which is no folder, is no checkpoint: ``not found``, or what it is instead (a FIFO given as a
    checkpoint was "not found")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    kind = "a regular file" if stat.S_ISREG(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket or device"
    return f"is {kind}, not a checkpoint folder"


# --- reading --------------------------------------------------------------------------------------------------------


def read_checkpoint_marker(path: Path) -> list[dict[str, Any]]:
    """The file records in checkpoint ``path``'s ``COMPLETE`` marker, refused unless it is there, well formed and
    lists ``metadata.json``."""
    marker = path / MARKER
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} {not_a_folder(path)}")
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {marker} is missing (interrupted save?)")
    try:
        files = read_json(marker)["files"]
        for record in files:
            name, size, digest = record["name"], record["size"], record["sha256"]
            if not (isinstance(name, str) and Path(name).name == name and name not in (".", "..", MARKER)):
                raise ValueError(f"unsafe file name {name!r}")
            if type(size) is not int or not isinstance(digest, str):
                raise ValueError(f"bad record for {name}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker}: unreadable or malformed marker ({e})") from e
    if METADATA not in {record["name"] for record in files}:
        raise CheckpointError(f"{marker}: does not list {METADATA}")
    return files


def verify_file(path: Path, record: dict[str, Any]) -> None:
    """Check the file of ``record`` in checkpoint ``path`` against its recorded size and sha256."""
    file = path / record["name"]
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (listed in {path / MARKER})")
    size = file.stat().st_size
    if size != record["size"]:
        raise CheckpointError(f"{file}: corrupt, {size} bytes instead of {record['size']}")
    with open(file, "rb") as f:
        digest = _sha256(f)
    if digest != record["sha256"]:
        raise CheckpointError(f"{file}: corrupt, sha256 differs from the one in {path / MARKER}")


def read_pickle(file: Path) -> Any:
    """A ``.pt`` part, loaded weights_only, with its numpy arrays decoded back."""
    with warnings.catch_warnings():  # torch warns of a foreign pickle's protocol before it refuses it
        warnings.simplefilter("ignore")
        return _decode(torch.load(file, map_location="cpu", weights_only=True), str(file))


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` part: its tensors by name."""
    return safetensors.torch.load_file(str(file))


def read_metadata(path: Path) -> dict[str, Any]:
    """``metadata.json``, refused by name unless it is an object whose ``step`` agrees with the folder's name."""
    file = path / METADATA
    try:
        metadata = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested deeper than Python recurses
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(metadata).__name__}")
    step = metadata.get("step")
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"{file}: 'step' must be a whole number in [0, {MAX_STEP}], got {step!r}")
    named = CHECKPOINT_NAME.fullmatch(path.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{file}: 'step' is {step} but the folder is named for step {int(named.group(1))}")
    return metadata
