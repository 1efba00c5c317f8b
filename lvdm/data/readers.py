"""Decode frames from video files (and images) into uint8 RGB arrays, one clear error per bad file.

Two readers with one interface, :data:`READERS`: ``"pyav"`` (always there, reads everything FFmpeg reads) and
``"decord"`` (optional, unmaintained). :func:`read_frames` with ``reader="auto"`` tries the installed readers of
:data:`AUTO_ORDER` in turn, each failure falling through to the next. The default order is PyAV only: measured
here it is as fast as decord (decoding at the target size, one swscale context per read), and decord silently
returns wrong frames on open-GOP streams (x265's default), see :class:`DecordReader`. Every per-file failure is a
:class:`~lvdm.errors.VideoReadError` with a short ``reason``.

The readers live in :mod:`.pyav_reader` (with the file checks both use: frame indices, seeking, orientation)
and :mod:`.decord_reader`. Frame index ``i`` is the ``i``-th frame the decoder outputs, in presentation order.

Timeouts: a decoder stuck in C code cannot be interrupted, so :func:`read_frames` and :func:`probe` run it in a
daemon thread and stop waiting after ``timeout`` seconds. The abandoned thread keeps its CPU (and file) until
FFmpeg returns, but does not block interpreter exit; the caller gets a VideoReadError naming file and timeout.

Display orientation: a rotation in the container's display matrix (phones) is applied, so ``probe`` and
``read_frames`` agree on the shown size (quarter turns; flips and other angles are ignored); the pixel aspect ratio
is not applied (frames keep their stored pixels).
Alpha is dropped; gray, 10-bit and odd sizes are converted by FFmpeg's swscale.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lvdm.data.decord_reader import DecordReader
from lvdm.data.pyav_reader import (
    AV_FAILURES,
    MAX_FPS,
    MIN_FPS,
    DecodeStopped,
    PyAVReader,
    av_reason,
    check_file,
    count_packets,
    decode_frames,
    duration_s,
    open_video,
    stated_stream_fps,
    stream_fps,
)
from lvdm.errors import VideoReadError

__all__ = [
    "AUTO_ORDER", "MAX_FPS", "MIN_FPS", "READERS", "DecordReader", "PyAVReader", "Reader", "VideoInfo",
    "VideoReadError", "available_readers", "image_to_rgb", "probe", "read_frames", "read_image",
]  # fmt: skip

T = TypeVar("T")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns from a video's headers and its first frame."""

    num_frames: int  # container frame count, else duration x fps, else a count of the packets; fewer if truncated
    fps: float | None  # average frame rate; None when missing, zero, non-finite or outside [MIN_FPS, MAX_FPS]
    width: int  # display size: after the rotation in the display matrix, before any pixel aspect ratio
    height: int
    stated_fps: float | None = field(default=None, compare=False)  # the rate as stated, outside [MIN_FPS, MAX_FPS]
    # too: sampling writes up to 1000 fps, and a video it wrote and reads back (to upscale, continue or
    # interpolate) keeps its rate

    def playback_fps(self) -> float | None:
        """The rate to play this video at when lvdm re-renders it: the stated rate within what lvdm writes
        (:data:`lvdm.sampling_settings.MIN_FPS` .. ``MAX_FPS``), else :attr:`fps`, which training takes."""
        from lvdm.sampling_settings import MAX_FPS as MAX_WRITTEN
        from lvdm.sampling_settings import MIN_FPS as MIN_WRITTEN

        rate = self.stated_fps
        return rate if rate is not None and MIN_WRITTEN <= rate <= MAX_WRITTEN else self.fps


class Reader(Protocol):
    """A frame reader: uint8 ``(n, h, w, 3)`` RGB frames at ``indices`` of ``path``, or a VideoReadError."""

    name: str

    @staticmethod
    def available() -> bool: ...

    def read(self, path: str, indices: Sequence[int], size: tuple[int, int] | None) -> np.ndarray: ...


READERS: dict[str, type[Reader]] = {"decord": DecordReader, "pyav": PyAVReader}
"""Frame readers by name: ``READERS[name]().read(path, indices, size)``."""

AUTO_ORDER: tuple[str, ...] = ("pyav",)
"""What ``reader="auto"`` tries, in order, skipping readers that are not installed; a VideoReadError from one
falls through to the next. ``("decord", "pyav")`` gives decord first with PyAV as the fallback."""


def available_readers() -> list[str]:
    """Names of the readers that work here: ``"pyav"`` always, ``"decord"`` when it imports."""
    return [name for name, reader in READERS.items() if reader.available()]


# --- public API -----------------------------------------------------------------------------------------------------


def _bounded(fn: Callable[[], T], timeout: float | None, path: str, what: str) -> T:
    """Run ``fn`` in a daemon thread and wait at most ``timeout`` seconds for it (then abandon the thread)."""
    if timeout is None:
        return fn()
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=target, name=f"lvdm-{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise VideoReadError(path, f"{what} timed out after {timeout:g}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _probe(path: str) -> VideoInfo:
    container, stream = open_video(path)
    with container:
        try:
            first = next(decode_frames(container, stream))
        except (StopIteration, DecodeStopped):
            raise VideoReadError(path, "no decodable frame") from None
        except AV_FAILURES as e:
            raise VideoReadError(path, av_reason(e)) from None
        fps, stated = stream_fps(stream), stated_stream_fps(stream)
        duration = duration_s(container, stream)
        counted = stream.frames  # mp4 and mov state it; mkv and webm do not, and duration x rate over-counts VFR
        estimate = round(duration * fps) if duration and fps else 0
    num_frames = counted or _packets_of(path) or estimate or 1  # the first frame decoded: at least one
    width, height = (first.height, first.width) if round(first.rotation / 90) % 2 else (first.width, first.height)
    return VideoInfo(num_frames=num_frames, fps=fps, width=width, height=height, stated_fps=stated)


def _packets_of(path: str) -> int:
    """:func:`count_packets`, remembered per file version (a training run probes a clip at every draw)."""
    info = os.stat(path)
    return _counted(path, info.st_ino, info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _counted(path: str, inode: int, size: int, mtime_ns: int) -> int:
    return count_packets(path)


def probe(path: str | os.PathLike, *, timeout: float | None = 30.0) -> VideoInfo:
    """Frame count, frame rate and display size of a video from its headers and first frame (no full decode; a
    container that states no frame count, mkv or webm, has its packets counted, without decoding them).

    Raises VideoReadError for anything that is not a readable video, including a truncated mp4 whose sample
    index points past the end of the file.
    """
    path = check_file(path)
    return _bounded(lambda: _probe(path), timeout, path, "probe")


def _check_request(indices: Sequence[int], size: tuple[int, int] | None, reader: str) -> list[str]:
    """Validate the caller's arguments (ValueError: a bug, not a bad file) and return the readers to try."""
    if len(indices) == 0 or min(indices) < 0:
        raise ValueError(f"indices must be a non-empty list of frame numbers >= 0, got {list(indices)[:8]}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (width, height) >= 1, got {size}")
    chains = {"auto": [name for name in AUTO_ORDER if READERS[name].available()], **{name: [name] for name in READERS}}
    if reader not in chains:
        raise ValueError(f"unknown reader {reader!r}; choose from {sorted(chains)}")
    if not READERS[chains[reader][0]].available():
        raise ValueError(f"reader {reader!r} is not installed here; available: {available_readers()}")
    return chains[reader]


def read_frames(
    path: str | os.PathLike,
    indices: Sequence[int],
    *,
    size: tuple[int, int] | None = None,
    reader: str = "auto",
    timeout: float | None = 30.0,
) -> np.ndarray:
    """The frames at ``indices`` (any order, repeats allowed) as uint8 ``(n, h, w, 3)`` RGB, in the order asked.

    ``size=(width, height)`` decodes at that size inside the reader (swscale), ``None`` keeps the display size.
    ``reader="auto"`` tries the readers of :data:`AUTO_ORDER`; ``"decord"`` or ``"pyav"`` uses only that one.
    An index past the last decodable frame raises VideoReadError ("truncated"/"too short"), never repeats a frame.
    ``timeout`` (seconds) bounds the whole call, fallback included; a hung decoder's thread is abandoned (see the
    module notes). PyAV seeks once, to the keyframe before the smallest index, then decodes up to the largest.
    """
    names = _check_request(indices, size, reader)
    path = check_file(path)
    indices = [int(i) for i in indices]

    def attempt() -> np.ndarray:
        for name in names[:-1]:
            try:
                return READERS[name]().read(path, indices, size)
            except VideoReadError:
                pass  # e.g. decord failed on this file: the next reader decides, with its own reason
        return READERS[names[-1]]().read(path, indices, size)

    return _bounded(attempt, timeout, path, "decode")


_HIGH_BIT_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535, "F": 1.0}  # mode -> white level


def image_to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: EXIF orientation applied, 16-bit scaled (not clipped), alpha dropped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_MODES:  # float32, in place: float64 copies of a 144 M pixel image took 4 GB
        values = np.asarray(image, dtype=np.float32).copy()
        values *= np.float32(255 / _HIGH_BIT_MODES[image.mode])
        values += np.float32(0.5)
        image = Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what Pillow asks for (it warned, a second line on stderr, converting to RGB)
    return image.convert("RGB")


def _read_rgb(path: str | os.PathLike, size: tuple[int, int] | None) -> np.ndarray:
    with Image.open(path) as image:
        if size is not None:
            image.draft(image.mode, (max(size), max(size)))  # JPEG: decode at a reduced scale, >= size either way
        rgb = image_to_rgb(image)
        if size is not None and rgb.size != tuple(size):
            rgb = rgb.resize(tuple(size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.array(rgb, dtype=np.uint8)  # writable: torch.from_numpy warns of a read-only array


def read_image(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as a one-frame clip: uint8 ``(1, h, w, 3)`` RGB, resized (bicubic) to ``size=(width, height)``."""
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (width, height) >= 1, got {size}")
    path = check_file(path, sniff=False)
    try:
        with warnings.catch_warnings():  # a large image is read as asked, not warned of (the error stands)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            array = _read_rgb(path, size)
    except FileNotFoundError:
        raise VideoReadError(path, "file vanished") from None
    except UnidentifiedImageError:
        raise VideoReadError(path, "not an image") from None
    except Image.DecompressionBombError:
        raise VideoReadError(path, "image too large (decompression bomb guard)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise VideoReadError(path, f"truncated or corrupt image ({e})") from None
    return array[None]  # h w 3 -> 1 h w 3
