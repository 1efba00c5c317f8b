"""Display sizes of every listed file, for aspect buckets: probed in parallel, remembered in an index file.

Bucketing needs each file's size before the first batch. Probing opens the container and decodes one frame
(about 2 ms a file on a local disk, far more on network storage), so a million clips cost half an hour per
start. Threads overlap that I/O (FFmpeg releases the GIL), and ``data.size_index`` keeps the answers: a line
per file, reused while the file's byte size and modification time are unchanged (a ``stat``: microseconds).

The index is a cache, never an authority: a line that does not parse, or a file that changed, is probed
again; an index that cannot be read or written is a warning; the file is rewritten atomically, so two ranks
writing it at once leave one complete version.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

from lvdm.data.sources import Entry
from lvdm.errors import VideoReadError
from lvdm.fileio import atomic_path, json_text, read_bounded

UNREADABLE = (1, 1)  # the size given to a file that cannot be probed: it fails later, named, when loaded
PROGRESS_FROM = 500  # files to probe before a progress bar is worth showing

Size = tuple[int, int]  # (width, height) as displayed


def media_sizes(
    entries: Sequence[Entry], *, index: str | os.PathLike | None = None, workers: int = 8, timeout: float | None = 30.0
) -> list[Size]:
    """``(width, height)`` of each entry's media, in order; :data:`UNREADABLE` for files that cannot be read.

    ``index``: a JSON-lines file to reuse sizes from and to write new ones to (created if missing).
    ``workers``: probing threads.
    """
    known, ours = _read_index(Path(index)) if index is not None else ({}, False)
    stamps = [_stamp(entry) for entry in entries]
    sizes: list[Size | None] = [_reuse(known.get(key), stamp) for key, stamp in stamps]
    missing = [i for i, size in enumerate(sizes) if size is None]
    if missing:
        probed = _probe_all([entries[i] for i in missing], workers=workers, timeout=timeout)
        for i, size in zip(missing, probed, strict=True):
            sizes[i] = size
            key, stamp = stamps[i]
            if key is not None:
                known[key] = {"stamp": stamp, "size": list(size)}
        if ours:
            _write_index(Path(index), known)
    return cast(list[Size], sizes)  # every None was probed


def _reuse(row: dict | None, stamp: list[int] | None) -> Size | None:
    """The remembered size if the file is unchanged since it was measured."""
    return tuple(row["size"]) if row is not None and row["stamp"] == stamp else None


def _stamp(entry: Entry) -> tuple[str | None, list[int] | None]:
    """``(absolute path, [bytes, mtime_ns])`` of the entry's media, or ``(None, None)`` when it is missing."""
    try:
        path = entry.media_path()
        stat = path.stat()
    except (VideoReadError, OSError):
        return None, None
    return str(path.absolute()), [stat.st_size, stat.st_mtime_ns]


def probe_size(entry: Entry, timeout: float | None = 30.0) -> Size:
    """One entry's display size, or :data:`UNREADABLE`."""
    from lvdm.data.readers import probe

    try:
        if entry.is_image:
            return image_size(entry.media_path())
        info = probe(entry.media_path(), timeout=timeout)
        return info.width, info.height
    except (VideoReadError, OSError, ValueError):
        return UNREADABLE


def image_size(path: str | os.PathLike) -> Size:
    """``(width, height)`` as displayed: EXIF orientations 5-8 swap the stored sides (``read_image`` rotates)."""
    from PIL import Image

    from lvdm.data.readers import check_file

    path = check_file(path, sniff=False)  # a FIFO would block Image.open
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)
            width, height = image.size
    except Image.DecompressionBombError:
        raise VideoReadError(path, "image too large (decompression bomb guard)") from None
    except (OSError, ValueError) as exc:
        raise VideoReadError(path, f"not a readable image ({type(exc).__name__})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _probe_all(entries: list[Entry], *, workers: int, timeout: float | None) -> list[Size]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(entries), desc="probing sizes for buckets", unit="file", disable=len(entries) < PROGRESS_FROM)
    with bar, ThreadPoolExecutor(max(1, workers)) as pool:
        sizes = []
        for size in pool.map(lambda entry: probe_size(entry, timeout), entries):
            sizes.append(size)
            bar.update()
    return sizes


def _read_index(path: Path) -> tuple[dict[str, dict], bool]:
    """``{absolute path: {"stamp": [bytes, mtime_ns], "size": [w, h]}}``, and whether lvdm may write the file: it
    is missing, or an index every line of which lvdm wrote. Anything else (a FIFO, a device, a user's file given
    by mistake) is read if it can be, never replaced."""
    try:
        text = read_bounded(path, 1 << 30, regular_only=True).decode("utf-8")  # about 10 M clips' lines
    except (FileNotFoundError, NotADirectoryError):
        return {}, not path.is_symlink()
    except (OSError, UnicodeDecodeError) as exc:
        warnings.warn(f"data.size_index {str(path)!r} cannot be read ({exc}); probing every file", stacklevel=3)
        return {}, False
    known, foreign = {}, 0
    for line in filter(str.strip, text.split("\n")):  # not splitlines(): U+2028 or U+0085 in a path is written raw
        try:
            row = json.loads(line)
            stamp, size = [int(v) for v in row["stamp"]], [int(v) for v in row["size"]]
            if len(stamp) == 2 and len(size) == 2 and min(size) >= 1:
                known[str(row["path"])] = {"stamp": stamp, "size": size}
                continue
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError):
            pass  # OverflowError: 1e400 is an infinity; RecursionError: JSON nested 100000 deep
        foreign += 1
    if foreign:
        message = f"data.size_index {str(path)!r} has {foreign} lines lvdm did not write; it is read, not replaced"
        warnings.warn(message, stacklevel=3)
    return known, not foreign


def _write_index(path: Path, known: dict[str, dict]) -> None:
    lines = [json_text({"path": key, **value}) for key, value in sorted(known.items())]
    try:
        with atomic_path(path) as temp:
            temp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:  # a cache that cannot be kept costs time, not correctness
        message = f"data.size_index {str(path)!r} could not be written ({exc}); sizes will be probed again"
        warnings.warn(message, stacklevel=3)
