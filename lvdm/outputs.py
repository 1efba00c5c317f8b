"""Where rendered videos go: output planning, VideoOutput, media files and their JSON sidecars."""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lvdm.errors import ConfigError, check_flag
from lvdm.fileio import (
    NAME_MAX,
    atomic_path,
    control_character,
    json_text,
    nearest_existing,
    read_bounded,
    read_json,
    write_failure,
    write_problem,
)

if TYPE_CHECKING:
    import torch

MEDIA_SUFFIXES = {".mp4": "mp4", ".gif": "gif"}  # any other path is a folder of PNG frames
FORMATS = ("mp4", "gif", "png")


# --------------------------------------------------------------------------------------------------- outputs
@dataclass
class VideoOutput:
    """The videos of one call.

    Attributes:
        frames: uint8 RGB ``(b, f, h, w, 3)``, prompt-major (all copies of the first prompt first).
        fps: the frame rate the files are written at.
        metadata: one sidecar dict per video (prompt, seed, settings, model, versions).
        latents: the denoised latents ``(b, c, f, h', w')``, float32 on the CPU.
        noise: the initial noise ``(b, c, f, h', w')`` (unit variance, before ``init_noise_sigma``).
    """

    frames: np.ndarray
    fps: float
    metadata: list[dict[str, Any]]
    latents: torch.Tensor
    noise: torch.Tensor

    def __len__(self) -> int:
        return len(self.frames)

    def save(self, path: str | os.PathLike, *, index: int | None = None, overwrite: bool = False) -> list[Path]:
        """Write video ``index`` (default: every video) by the path: ``.mp4`` (H.264), ``.gif``, or any other path
        a folder of PNG frames; each with a JSON sidecar ``<path>.json``.

        Several videos to one path are numbered: ``clip.mp4`` -> ``clip_000.mp4``, ``clip_001.mp4`` ...
        A file that exists by the time it is written is an error and stays as it is (it may be the user's own),
        unless ``overwrite=True``, which replaces it.
        Returns the media paths (files or frame folders).
        """
        if not isinstance(path, str | os.PathLike):
            raise ConfigError(f"path must be a file or folder path (str or os.PathLike), got {path!r}")
        if not os.fspath(path).strip() or not Path(path).name:  # "", "." and "/": pathlib's ValueError naming "."
            raise ConfigError(f"the output {os.fspath(path)!r} names no file or folder of its own (its sidecar is "
                              "<name>.json); give a .mp4 or .gif file, or a folder for PNG frames")  # fmt: skip
        check_flag("overwrite", overwrite)
        if index is not None:
            if (
                isinstance(index, bool)
                or not isinstance(index, numbers.Integral)
                or not -len(self) <= index < len(self)
            ):
                raise ConfigError(f"index must be an integer in -{len(self)} .. {len(self) - 1}, got {index!r}")
            targets = {int(index) % len(self): Path(path)}
        elif len(self) == 1:
            targets = {0: Path(path)}
        else:
            targets = {k: Path(_numbered(path, k, len(self))) for k in range(len(self))}
        for target in targets.values():  # before any is written
            if media_kind(target) == "png" and (target.exists() or target.is_symlink()) and not target.is_dir():
                raise ConfigError(f"cannot write PNG frames into {target}: it exists and is not a folder")
            if (side := sidecar_path(target)).is_dir() and not side.is_symlink():  # found after the video was written
                raise ConfigError(
                    f"{side} is a folder, which {target.name}'s sidecar cannot replace; choose another path"
                )
        if not overwrite:  # found part-way, it left the videos (or frames) before it, or a video without its sidecar
            self._refuse_existing(targets.values())
        return [self._write(k, target, overwrite) for k, target in targets.items()]

    def _refuse_existing(self, targets: Iterable[Path]) -> None:
        """The :class:`~lvdm.errors.OutputWriteError` a write would meet, before any file is written: a file (a
        link too) where a video, one of its PNG frames or its sidecar goes."""
        from lvdm.media import frame_paths

        for target in targets:
            files = frame_paths(target, self.frames.shape[1]) if media_kind(target) == "png" else [target]
            if taken := [path for path in (*files, sidecar_path(target)) if os.path.lexists(path)]:
                raise write_failure(taken[0], FileExistsError(taken[0]))

    def _write(self, index: int, path: str | os.PathLike, overwrite: bool) -> Path:
        from lvdm.media import WRITERS

        kind = media_kind(path)
        target = Path(path)
        try:
            WRITERS[kind](self.frames[index], target, self.fps, not overwrite)
        except ValueError as exc:  # e.g. an fps GIF cannot store
            raise ConfigError(f"cannot write {target}: {exc}") from exc
        record = self.metadata[index] | {"file": target.name, "format": kind}
        write_json(record, sidecar_path(target), exclusive=not overwrite)
        return target


def media_kind(path: str | os.PathLike) -> str:
    """``"mp4"`` or ``"gif"`` by suffix; ``"png"`` (a folder of frames) for a path without a suffix or ending in
    a separator, or an existing folder. Another suffix is a :class:`ConfigError`."""
    text = os.fspath(path)
    if suffix := media_suffix(text):
        return MEDIA_SUFFIXES[suffix]
    if _names_a_folder(text):
        return "png"
    suffix = Path(text).suffix.lower()
    raise ConfigError(f"{text}: unknown output suffix {suffix!r}; use .mp4, .gif, or a folder (ending in /) for PNGs")


def media_suffix(text: str) -> str | None:
    """``".mp4"`` or ``".gif"`` for a file path with that suffix; ``None`` otherwise, and for ``clip.mp4/``, which
    names a folder as a shell's completion does."""
    suffix = Path(text).suffix.lower()
    return suffix if suffix in MEDIA_SUFFIXES and not text.endswith(("/", os.sep)) else None


def _names_a_folder(text: str) -> bool:
    """Whether an output path is a folder: no suffix, a trailing separator, or an existing folder."""
    return not Path(text).suffix or text.endswith(("/", os.sep)) or Path(text).is_dir()


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the JSON sidecar of an output goes: ``clip.mp4`` -> ``clip.mp4.json``, ``frames/`` -> ``frames.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_json(data: dict[str, Any], path: Path, *, exclusive: bool = False) -> Path:
    """Write ``data`` as indented JSON, atomically (a temp file, then a rename; ``exclusive``: never over a file)."""
    with atomic_path(path, exclusive=exclusive) as temp:
        temp.write_text(json_text(data, indent=2) + "\n", encoding="utf-8")
    return path


def _numbered(path: str | os.PathLike, index: int, count: int) -> Path:
    """``clip.mp4`` -> ``clip_007.mp4``; ``frames/`` -> ``frames_007``."""
    path = Path(path)
    digits = max(3, len(str(count - 1)))
    kind = media_kind(path)
    stem, suffix = (path.name, "") if kind == "png" else (path.stem, path.suffix)
    return path.with_name(f"{stem}_{index:0{digits}d}{suffix}")


def plan_outputs(
    out: str | os.PathLike,
    prompts: Sequence[str],
    *,
    num_videos_per_prompt: int = 1,
    format: str = "mp4",
    overwrite: bool = False,
) -> list[Path]:
    """One output path per video: ``out`` itself (numbered if several) when it ends in ``.mp4``/``.gif``; else a
    folder holding ``000-<prompt words>.<format>`` ... (``format`` ``png``: one frame folder per video).

    Checks that the output can be written, before anything heavy is loaded; creates nothing. A video (or its
    sidecar) that already exists is a :class:`ConfigError` naming it, unless ``overwrite``.
    """
    _check_format(format)
    count = len(prompts) * num_videos_per_prompt
    text = os.fspath(out)
    if not text.strip():  # "" wrote into the working folder
        raise ConfigError(f"the output is empty ({text!r}); give a .mp4 or .gif file, or a folder ending in /")
    refuse_control_characters(text)
    if media_suffix(text):
        paths = [Path(text)] if count == 1 else [_numbered(text, k, count) for k in range(count)]
    else:
        if not _names_a_folder(text):
            raise ConfigError(
                f"{text}: unknown output suffix {Path(text).suffix.lower()!r}; use a .mp4 or .gif file, or a folder "
                f"(ending in /) for one {'/'.join(FORMATS)} output per video (format)"
            )
        digits = max(3, len(str(count - 1)))
        ext = "" if format == "png" else f".{format}"
        names = [f"{k:0{digits}d}-{_slug(prompts[k // num_videos_per_prompt])}" for k in range(count)]
        paths = [Path(text) / f"{name.rstrip('-')}{ext}" for name in names]
    _check_writable(paths[0].parent)
    check_outputs(paths, overwrite=overwrite)
    return paths


def check_outputs(paths: Sequence[Path], *, overwrite: bool) -> None:
    """That the outputs ``paths`` (videos, or PNG frame folders) and their sidecars can be written, before the work
    (``sample.py --upscaler`` checks its ``_x4`` files with it): names that fit, no folder where a file goes (a
    sidecar's was found after its video was written), and none there already unless ``overwrite``."""
    long = [p.name for path in paths for p in (path, sidecar_path(path)) if len(os.fsencode(p.name)) > NAME_MAX]
    if long:
        size = len(os.fsencode(long[0]))
        raise ConfigError(f"output name {long[0]!r} is {size} bytes long; a file name holds at most {NAME_MAX}, and a "
                          "sidecar adds .json to its video's: choose a shorter one")  # fmt: skip
    files = [p for path in paths for p in (path, sidecar_path(path)) if p is not path or media_suffix(str(p))]
    if folders := [p for p in files if p.is_dir() and not p.is_symlink()]:
        raise ConfigError(f"{folders[0]} is a folder, which a file cannot replace (--overwrite neither); choose "
                          "another output")  # fmt: skip
    frames = [path for path in paths if not media_suffix(str(path))]  # PNG frame folders
    if taken := [path for path in frames if os.path.lexists(path) and not path.is_dir()]:  # found once sampled
        raise ConfigError(f"cannot write PNG frames into {taken[0]}: it exists and is not a folder (--overwrite "
                          "cannot replace it); choose another output")  # fmt: skip
    if not overwrite:
        refuse_existing(paths)


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"format: expected one of {list(FORMATS)}, got {format!r}")


def check_given_outputs(paths: Sequence[Path], *, format: str, overwrite: bool) -> None:
    """One output per video as a caller gave them (``VideoPipeline.render``'s ``out`` as a list), checked as
    :func:`plan_outputs` checks the paths it plans: a known ``format`` (each path's suffix says its kind, as a
    single ``.mp4`` does), no blank name or control character, folders they can go in, and :func:`check_outputs`."""
    _check_format(format)
    for path in paths:
        if not os.fspath(path).strip():
            raise ConfigError(f"the output is empty ({os.fspath(path)!r}); give a .mp4 or .gif file, or a folder")
        refuse_control_characters(path)
    for folder in dict.fromkeys(path.parent for path in paths):
        _check_writable(folder)
    check_outputs(paths, overwrite=overwrite)


def refuse_control_characters(output: str | os.PathLike) -> None:
    """A :class:`ConfigError` for an output name holding a control character: a newline in it split every message
    and listing that named the file."""
    text = os.fspath(output)
    if control := control_character(text):
        raise ConfigError(f"the output {text!r} holds a control character ({control!r}); choose a name without one")


def check_output_file(path: Path, *, overwrite: bool) -> None:
    """A file a command will write (a module, a LoRA), checked before the work: no control character, a name that
    fits, a folder it can go in, not a folder itself, and not there already (a link counts, even a dangling one)
    unless ``overwrite``."""
    refuse_control_characters(path)
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise ConfigError(f"{path.name!r} is {len(os.fsencode(path.name))} bytes long; a file name holds at most "
                          f"{NAME_MAX}: choose a shorter one")  # fmt: skip
    _check_writable(path.parent)
    if path.is_dir() and not path.is_symlink():  # --overwrite cannot replace it either
        raise ConfigError(f"{path} is a folder; choose another file")
    if os.path.lexists(path) and not overwrite:
        raise ConfigError(f"{path} already exists; choose another file, or overwrite it (--overwrite)")


def output_folder(text: str | os.PathLike) -> Path:
    """``text`` as the folder a command writes its own file names into (the examples' ``--out``, a MotionAdapter's):
    refused when empty (it was the working folder) or holding a control character."""
    if not os.fspath(text).strip():
        raise ConfigError(f"the output folder is empty ({os.fspath(text)!r}); name a folder")
    refuse_control_characters(text)
    return Path(text)


def module_output(text: str | os.PathLike) -> Path:
    """``text`` as the ``.safetensors`` file a temporal module is written to (``lvdm.export``, ``lvdm.convert
    motion-module``): refused when empty (``Path("")`` is the working folder: ".: ... written as .safetensors"), of
    another suffix, or holding a control character."""
    if not os.fspath(text).strip():
        raise ConfigError(f"the output is empty ({os.fspath(text)!r}); name the .safetensors file to write")
    out = Path(text)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: a temporal module is written as .safetensors")
    refuse_control_characters(out)
    return out


def refuse_existing(paths: Sequence[Path]) -> None:
    """A :class:`ConfigError` naming the first of ``paths`` (or their sidecars) that exists, a dangling link too."""
    existing = [p for path in paths for p in (path, sidecar_path(path)) if os.path.lexists(p)]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ConfigError(
            f"{existing[0]} already exists{more}; choose another output, or overwrite it (--overwrite, overwrite=True)"
        )


def _slug(prompt: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-")


def _check_writable(folder: Path) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder a file can be written in (probed by writing:
    the write failed only after sampling where ``os.access`` said yes)."""
    probe = nearest_existing(folder)
    if problem := write_problem(probe):
        raise ConfigError(f"output folder {folder} cannot be created or written ({probe} is not a writable folder: "
                          f"{problem})")  # fmt: skip


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines are skipped. A leading byte-order mark (Notepad's
    "UTF-8 with BOM") is no part of the first prompt: it was kept, a different text to the encoder."""
    path = Path(path)
    try:
        lines = read_bounded(path, MAX_TEXT_BYTES).decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompts file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from exc
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompts (one per line)")
    return prompts


MAX_TEXT_BYTES = 16 << 20  # a prompts file or sidecar larger than this is not one (/dev/zero filled memory)
SIDECAR_KEYS = {"prompt": str, "settings": dict, "model": dict}
_MODEL_PATHS = ("base", "base_config", "temporal", "spatial_weights", "image_adapter", "image_encoder", "decoder",
                "dtype")  # fmt: skip


def _sidecar_type_problem(meta: dict[str, Any]) -> str | None:
    """What in a sidecar's fields that re-rendering reads has the wrong type (a sidecar can come from anyone)."""
    model = meta["model"]
    for key in _MODEL_PATHS:
        if model.get(key) is not None and not isinstance(model[key], str):
            return f"model.{key} must be a path (a string), got {model[key]!r}"
    loras = model.get("loras")
    if loras is not None and not (isinstance(loras, list) and all(isinstance(x, str) for x in loras)):
        return f"model.loras must be a list of 'PATH[:SCALE]' strings, got {loras!r}"
    for key in ("context", "interpolate", "image"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            return f"{key} must be an object, got {meta[key]!r}"
    for key, kind in (("format", str), ("device", str), ("base_noise", int | str)):
        if meta.get(key) is not None and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            return f"{key} has the wrong type: {meta[key]!r}"
    factor = (meta.get("interpolate") or {}).get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int)):
        return f"interpolate.factor must be a whole number, got {factor!r}"
    return None


def read_sidecar_json(path: str | os.PathLike) -> Any:
    """A sidecar's JSON (at most 16 MiB, a regular file), or a :class:`ConfigError` saying why it cannot be read."""
    try:
        return read_json(path, MAX_TEXT_BYTES)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"sidecar {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from exc


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """A video's JSON sidecar, checked to hold what re-rendering it needs (``prompt``, ``settings``, ``model``).

    A video whose initial or base noise was given as a tensor cannot be re-rendered from its sidecar (which keeps
    only a fingerprint of it): a :class:`ConfigError`, as is a file that is not a sidecar.
    """
    meta = read_sidecar_json(path)
    if isinstance(meta, dict) and isinstance(meta.get("upscale"), dict):
        raise ConfigError(f"{path} is an upscale's sidecar: python -m lvdm.upscale --from-json {path} re-renders it")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), kind) for k, kind in SIDECAR_KEYS.items()):
        raise ConfigError(f"{path} is not an lvdm sidecar (it needs {', '.join(SIDECAR_KEYS)})")
    if problem := _sidecar_type_problem(meta):
        raise ConfigError(f"sidecar {path}: {problem}")
    if meta.get("initial_noise") == "given" or isinstance(meta.get("base_noise"), str):
        raise ConfigError(f"sidecar {path}: its video started from a noise tensor that the sidecar does not hold")
    return meta
