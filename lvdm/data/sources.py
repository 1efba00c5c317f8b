"""Where samples come from: a folder of captioned clips, a WebVid CSV, a JSONL/CSV manifest, images.

Each source turns its listing into :class:`Entry` rows without opening any media (a 10M-row
WebVid CSV lists in seconds). Problems that belong to one row (its caption file, a path that
escapes the data root, a video missing on disk) are found when the row is loaded and become a
bad sample with a reason; problems with the listing itself (no such file, no usable column)
are a :class:`~lvdm.errors.DataError` at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lvdm.errors import DataError, VideoReadError
from lvdm.fileio import read_bounded

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_CAPTION_BYTES = 1 << 20  # a caption file larger than this is refused (no tokenizer reads that much)
MAX_LISTING_FIELD = 1 << 20  # longer CSV fields make their row a bad sample
_PROBLEM = "\0problem"  # key of a listing row that could not be read; no CSV or JSON column can be named so


@dataclass(frozen=True)
class Entry:
    """One listed sample: its media file and where its caption is."""

    path: Path
    caption: str | None = None  # given inline (CSV/JSONL), or
    caption_file: Path | None = None  # read when the sample loads
    fps: float | None = None  # a manifest's fps hint (the container's own rate is preferred)
    is_image: bool = False
    source: str = ""
    alternatives: tuple[Path, ...] = ()  # other places the file may be (WebVid: nested or flat)
    problem: str | None = None  # known bad before opening (e.g. path outside the data root)

    def read_caption(self) -> str:
        """The caption text; a bad one (missing, empty, not UTF-8) is a :class:`VideoReadError`."""
        if self.caption_file is not None:
            try:
                text = read_caption_file(self.caption_file).decode("utf-8")
            except FileNotFoundError:
                raise VideoReadError(self.path, f"caption file missing: {self.caption_file.name}") from None
            except UnicodeDecodeError:
                raise VideoReadError(self.path, "caption is not UTF-8") from None
            except OSError as exc:  # permission denied, a folder named like the caption, a FIFO, ...
                reason = f"caption file unreadable: {self.caption_file.name} ({exc.strerror or type(exc).__name__})"
                raise VideoReadError(self.path, reason) from None
        else:
            text = self.caption or ""
        if any("\ud800" <= ch <= "\udfff" for ch in text):  # undecodable bytes kept as surrogates, or a lone one
            raise VideoReadError(self.path, "caption is not UTF-8")
        text = " ".join(text.split())
        if not text:
            raise VideoReadError(self.path, "caption empty")
        return text

    def stamp(self) -> dict[str, object]:
        """What tells this sample from an edited one: the size and modification time (ns) of its media file and
        caption file (``None`` for one that cannot be seen now), a digest of its inline caption and its fps hint."""
        inline = self.caption.encode("utf-8", "surrogatepass") if self.caption is not None else None
        return {
            "media": _file_stamp(self.path, *self.alternatives),
            "caption_file": _file_stamp(self.caption_file) if self.caption_file is not None else None,
            "caption": hashlib.sha256(inline).hexdigest()[:16] if inline is not None else None,
            "fps": self.fps,
        }

    def media_path(self) -> Path:
        """The first existing candidate path (WebVid rows may be nested or flat)."""
        for candidate in (self.path, *self.alternatives):
            if candidate.exists():
                return candidate
        raise VideoReadError(self.path, "file not found")


def _file_stamp(*candidates: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of the first candidate that can be seen (links followed), else ``None``."""
    for candidate in candidates:
        try:
            info = candidate.stat()
        except (OSError, ValueError):  # missing, a link loop, a name the system refuses
            continue
        return [info.st_size, info.st_mtime_ns]
    return None


def read_caption_file(path: Path) -> bytes:
    """The bytes of a caption file, which must be a regular file of at most :data:`MAX_CAPTION_BYTES`: a FIFO or a
    device named like a caption is refused at once instead of hanging the loader, a larger file instead of read."""
    return read_bounded(path, MAX_CAPTION_BYTES, regular_only=True)


def folder_source(root: str | os.PathLike, *, images: bool = False, allow_links_outside: bool = False) -> list[Entry]:
    """Every clip (or image) under ``root``, recursively, captioned by the same-name ``.txt`` file.

    A file that is a symlink resolving outside ``root`` becomes a bad sample (like a manifest path that escapes)
    unless ``allow_links_outside``.
    """
    root = _existing_dir(root)
    suffixes = IMAGE_SUFFIXES if images else VIDEO_SUFFIXES
    unlisted: list[OSError] = []
    entries = [
        Entry(
            path,
            caption_file=path.with_suffix(".txt"),
            is_image=images,
            source=str(root),
            problem=None if allow_links_outside else _escape_problem(root, path, path.with_suffix(".txt")),
        )
        for path in sorted(_walk(root, unlisted))
        if path.suffix.lower() in suffixes
    ]
    for error in sorted(unlisted, key=lambda error: str(error.filename)):  # a folder that cannot be listed
        reason, folder = error.strerror or type(error).__name__, Path(error.filename or root)
        if folder == root:
            raise DataError(f"data folder {root} cannot be listed: {reason}")
        problem = f"folder cannot be listed ({reason}): the clips in it are not read"
        warnings.warn(f"data folder {folder} {problem}; it counts as one bad sample", stacklevel=2)
        entries.append(Entry(folder, caption="", is_image=images, source=str(root), problem=problem))
    return entries


def webvid_source(csv_path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> list[Entry]:
    """A WebVid-style CSV (``videoid``, ``name`` as caption, ``page_dir``): ``{page_dir}/{videoid}.mp4`` or flat."""
    csv_path = _existing_file(csv_path)
    root = Path(video_root) if video_root is not None else csv_path.parent
    rows = _read_rows(csv_path)
    _require_columns(csv_path, rows, [("videoid",), ("name",)])
    entries = []
    for row in rows:
        if _PROBLEM in row:
            entries.append(Entry(csv_path, caption="", source=str(csv_path), problem=row[_PROBLEM]))
            continue
        videoid, page_dir = (row.get("videoid") or "").strip(), (row.get("page_dir") or "").strip()
        nested, flat = root / page_dir / f"{videoid}.mp4", root / f"{videoid}.mp4"
        entries.append(
            Entry(
                nested if page_dir else flat,
                caption=row.get("name") or "",
                alternatives=(flat,) if page_dir else (),
                source=str(csv_path),
                problem=_escape_problem(root, nested, flat) or (None if videoid else "row has no videoid"),
            )
        )
    return entries


def manifest_source(
    path: str | os.PathLike, video_root: str | os.PathLike | None = None, *, images: bool = False
) -> list[Entry]:
    """A JSONL or CSV manifest: ``video``/``path`` (``image`` for images), ``caption``/``text``, optional ``fps``.

    Paths are relative to ``video_root`` (default: the manifest's folder) and must stay inside it.
    """
    path = _existing_file(path)
    root = Path(video_root) if video_root is not None else path.parent
    rows = _read_rows(path)
    media_keys = ("image", "path") if images else ("video", "path")
    _require_columns(path, rows, [media_keys, ("caption", "text")])
    entries = []
    for row in rows:
        if _PROBLEM in row:
            entries.append(Entry(path, caption="", is_image=images, source=str(path), problem=row[_PROBLEM]))
            continue
        media, caption = _first(row, media_keys), _first(row, ("caption", "text"))
        media = media.strip() if isinstance(media, str) else media
        full = root / media if isinstance(media, str) else path
        problem = _row_problem(media, caption) or _escape_problem(root, full)
        entries.append(
            Entry(
                full,
                caption=caption if isinstance(caption, str) else None,
                fps=_number(row.get("fps")),
                is_image=images,
                source=str(path),
                problem=problem,
            )
        )
    return entries


def image_source(path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> list[Entry]:
    """Images as one-frame, image-only samples: a folder (``.txt`` captions) or a manifest."""
    return folder_source(path, images=True) if Path(path).is_dir() else manifest_source(path, video_root, images=True)


SOURCES: dict[str, Callable[..., list[Entry]]] = {
    "folder": lambda path, video_root=None: folder_source(path),
    "webvid": webvid_source,
    "manifest": manifest_source,
    "images": image_source,
}


# --------------------------------------------------------------------- helpers
def _walk(root: Path, errors: list[OSError]) -> Iterator[Path]:
    """The files under ``root``; a folder that cannot be listed is appended to ``errors``."""
    for folder, _, files in os.walk(root, onerror=errors.append, followlinks=False):
        for name in files:
            yield Path(folder) / name


def _existing_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist or is not a folder")
    return path


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file (a FIFO, device or folder)" if path.exists() else "does not exist"
        raise DataError(f"data listing {path} {what}")  # a FIFO or /dev/zero link was said not to exist
    return path


def _read_rows(path: Path) -> list[dict]:
    """Rows of a ``.jsonl`` or ``.csv`` file; bytes that are not UTF-8 survive as surrogates (a bad caption later)."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    if path.suffix.lower() in (".jsonl", ".json"):
        # lines end at \n, \r\n or \r only: str.splitlines() also splits at U+2028, U+0085, form feeds..., which
        # JSON strings may hold raw (json.dumps(ensure_ascii=False) writes them so)
        lines = re.split(r"\r\n|\r|\n", text)
        return [_json_row(path, i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if path.suffix.lower() in (".csv", ".tsv"):
        return _csv_rows(text, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    raise DataError(f"data listing {path}: unknown format '{path.suffix}' (use .csv, .tsv or .jsonl)")


def _csv_rows(text: str, delimiter: str) -> list[dict]:
    """CSV rows as dicts; a row the csv module cannot read (a field over the limit) is kept as a ``_problem``."""
    # as the csv module asks (newline=""): str.splitlines() dropped the line breaks inside quoted fields ("a\nb" read
    # as "ab") and split rows at U+2028, U+0085 and form feeds
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_LISTING_FIELD)
    try:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                rows.append({_PROBLEM: f"unreadable CSV row: row {len(rows) + 1}, {exc}"})  # grouped as one kind
                continue
            rows.append(row)
    finally:
        csv.field_size_limit(limit)
    return rows


class _HugeNumber(Exception):
    """A JSON integer past Python's limit on the digits ``int()`` reads: valid JSON, a bad row."""


def _json_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:
        raise _HugeNumber(len(digits.lstrip("-"))) from None


def _json_row(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line, parse_int=_json_int)
    except _HugeNumber as exc:  # as an oversized CSV field: that row's problem, not the listing's
        return {_PROBLEM: f"unreadable JSON row: line {number}, a number of {exc.args[0]} digits"}
    except (ValueError, RecursionError) as exc:  # also an array nested 100000 deep
        raise DataError(f"{path} line {number}: not valid JSON ({getattr(exc, 'msg', None) or exc})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
    return row


def _require_columns(path: Path, rows: list[dict], groups: list[tuple[str, ...]]) -> None:
    """The listing's columns judged on its first 100 readable rows; rows that could not be read say why as bad
    samples (a listing whose every row is unreadable is an all-bad dataset, not one without a 'video' column)."""
    if not rows:
        raise DataError(f"data listing {path} has no rows")
    readable = [row for row in rows if _PROBLEM not in row][:100]
    if not readable:
        return
    columns = set().union(*(row.keys() for row in readable))
    for group in groups:
        if not columns & set(group):
            raise DataError(f"data listing {path} has no {' or '.join(repr(c) for c in group)} column")


def _first(row: dict, keys: tuple[str, ...]) -> object:
    return next((row[k] for k in keys if row.get(k) not in (None, "")), None)


def _row_problem(media: object, caption: object) -> str | None:
    """Why a listing row's fields cannot be a sample (JSON gives numbers, lists and objects where CSV gives text)."""
    if not media:
        return "row has no media path"
    for name, value in (("media path", media), ("caption", caption)):
        if value is not None and not isinstance(value, str):
            return f"{name} is not text (a JSON {type(value).__name__})"
    if caption is not None and len(caption) > MAX_LISTING_FIELD:  # as a CSV field that long is (csv counts characters)
        return f"caption over {MAX_LISTING_FIELD} characters"
    return None


def _number(value: object) -> float | None:
    if isinstance(value, bool):  # JSON true is not 1 fps (an unusable hint is no hint)
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float's range
        return None
    return number if math.isfinite(number) and number > 0 else None


def _escape_problem(root: Path, *paths: Path) -> str | None:
    """A reason when any path resolves outside ``root`` (``../``, absolute paths, symlinks out)."""
    base = root.resolve()
    for path in paths:
        if "\0" in str(path):
            return "path contains a NUL byte"
        try:  # strict: from Python 3.13 a loop is no error otherwise
            resolved = path.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):  # missing (said when read), or a link out of the root
            resolved = path.resolve()
        except RuntimeError:  # a loop before Python 3.13 (its message names the path: not one group)
            return "unresolvable path: a symlink loop"
        except OSError as exc:  # a loop from Python 3.13 (ELOOP), permissions
            return f"unresolvable path: {exc.strerror or type(exc).__name__}"
        if not resolved.is_relative_to(base):
            return f"path escapes the data root {root}"
    return None
