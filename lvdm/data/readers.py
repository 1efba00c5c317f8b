"""Decode frames from video files (and images) into uint8 RGB arrays, one clear error per bad file.

Two readers with one interface, :data:`READERS`: ``"pyav"`` (always there, reads everything FFmpeg reads) and
``"decord"`` (optional, unmaintained). :func:`read_frames` with ``reader="auto"`` tries the installed readers of
:data:`AUTO_ORDER` in turn, each failure falling through to the next. The default order is PyAV only: measured
here it is as fast as decord (decoding at the target size, one swscale context per read), and decord silently
returns wrong frames on open-GOP streams (x265's default), see :class:`DecordReader`. Every per-file failure is a
:class:`~lvdm.errors.VideoReadError` with a short ``reason``.

Frame index ``i`` means the ``i``-th frame the decoder outputs (presentation order), for constant and variable
frame rate alike. PyAV seeks to the keyframe before the first wanted frame when the timestamps are regular (index
-> pts through the average rate) and checks every decoded timestamp against that mapping; a file whose timestamps
disagree is read again from the start.

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
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol, TypeVar

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps, UnidentifiedImageError

from lvdm.errors import VideoReadError

MAX_FPS, MIN_FPS = 240.0, 1.0  # frame rates outside this range are reported as missing (None)
_SNIFF_BYTES = 512
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG image", b"\xff\xd8\xff": "JPEG image", b"II*\x00": "TIFF image"}
_TEXT_VIDEO_MAGIC = (b"YUV4MPEG2 ",)  # raw video whose header (and maybe first pixels) read as text
_IMAGE_DEMUXERS = ("image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "tiff_pipe", "webp_pipe")
_AV_FAILURES = (av.error.FFmpegError, OSError, ValueError)  # what PyAV raises for a file it cannot handle
_SEEK_BACKOFF = (0, 8, 64)  # frames before the first wanted one to seek to, in turn, while a seek lands past it
_PTS_TOLERANCE = 0.25  # how far (in frames) a timestamp may sit off the index grid and still count as on it

T = TypeVar("T")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns from a video's headers and its first frame."""

    num_frames: int  # container frame count, else duration x fps, else a count of the packets; fewer if truncated
    fps: float | None  # average frame rate; None when missing, zero, non-finite or outside [MIN_FPS, MAX_FPS]
    width: int  # display size: after the rotation in the display matrix, before any pixel aspect ratio
    height: int


class Reader(Protocol):
    """A frame reader: uint8 ``(n, h, w, 3)`` RGB frames at ``indices`` of ``path``, or a VideoReadError."""

    name: str

    @staticmethod
    def available() -> bool: ...

    def read(self, path: str, indices: Sequence[int], size: tuple[int, int] | None) -> np.ndarray: ...


class _Unreliable(Exception):
    """Timestamps after a seek disagree with index -> pts; the caller decodes from the start instead."""


# --- files and containers -------------------------------------------------------------------------------------------


def _check_file(path: str | os.PathLike, *, sniff: bool = True) -> str:
    """Fail early, with a plain reason, on files no decoder should see: missing, empty, unreadable, text, images."""
    try:
        if Path(path).stat().st_size == 0:
            raise VideoReadError(path, "zero-byte file")
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise VideoReadError(path, "file not found") from None
    except PermissionError:
        raise VideoReadError(path, "permission denied") from None
    except IsADirectoryError:
        raise VideoReadError(path, "is a directory") from None
    except OSError as e:
        raise VideoReadError(path, f"cannot read file: {e.strerror or e}") from None
    if sniff:
        kind = next((name for magic, name in _IMAGE_MAGIC.items() if head.startswith(magic)), None)
        if kind is not None:
            raise VideoReadError(path, f"not a video ({kind})")
        if _looks_like_text(head) and not head.startswith(_TEXT_VIDEO_MAGIC):
            raise VideoReadError(path, "not a video (text file?)")
    return str(path)


def _looks_like_text(head: bytes) -> bool:
    """No NUL byte and valid UTF-8 (a character cut at the end allowed): no video container starts like that."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"
    return True


_AV_REASONS = {  # PyAV exception type -> reason (the file passed _check_file a moment before)
    FileNotFoundError: "file vanished",
    PermissionError: "permission denied",
    av.error.InvalidDataError: "invalid or truncated container",
}


def _av_reason(error: BaseException) -> str:
    """A few words for an exception PyAV raised while opening or decoding."""
    return next((r for kind, r in _AV_REASONS.items() if isinstance(error, kind)), f"{type(error).__name__}: {error}")


def _open_video(path: str) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open ``path`` and return it with its first video stream, checked to be a decodable video."""
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError) as e:
        raise VideoReadError(path, _av_reason(e)) from None
    try:
        if container.format.name in _IMAGE_DEMUXERS:
            raise VideoReadError(path, f"not a video ({container.format.name} image)")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise VideoReadError(path, "no video stream" + (f" ({' + '.join(kinds)} only)" if kinds else ""))
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoReadError(path, "truncated or corrupt header: video stream without codec parameters")
        stream.codec_context.thread_count = 1  # data loaders run many workers; one thread each
        _check_complete(container, stream, path)
    except BaseException:
        container.close()
        raise
    return container, stream


def _check_complete(container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: str) -> None:
    """Raise "truncated" when the container's sample index points past the end of the file (mp4/mov)."""
    entries = stream.index_entries
    needed = max((entries[i].pos + entries[i].size for i in range(max(0, len(entries) - 16), len(entries))), default=0)
    size = container.size
    if size > 0 and needed > size:
        raise VideoReadError(path, f"truncated: file has {size} bytes, its index needs {needed}")


def _too_short(last: int, num_frames: int) -> str:
    return f"too short: frame {last} requested, the video has {num_frames} frames"


def _fps(stream: av.video.stream.VideoStream) -> float | None:
    """The average frame rate, or None when missing, zero, non-finite or absurd."""
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else math.nan
    return fps if math.isfinite(fps) and MIN_FPS <= fps <= MAX_FPS else None


def _duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else None


def _count_packets(path: str) -> int:
    """Demux (no decode) the whole video stream and count its packets: the last resort for the frame count."""
    container, stream = _open_video(path)
    with container:
        try:
            return sum(1 for packet in container.demux(stream) if packet.size)
        except av.error.FFmpegError:
            return 0


# --- PyAV -----------------------------------------------------------------------------------------------------------


def _seek_step(stream: av.video.stream.VideoStream) -> Fraction | None:
    """Ticks (of ``time_base``) per frame when the stream is constant-rate with known timestamps; else None."""
    average, base = stream.average_rate, stream.base_rate
    if not (average and base and stream.time_base and stream.start_time is not None):
        return None
    if abs(float(average) / float(base) - 1) > 0.01:  # base_rate is the finest rate of all timestamps: VFR if off
        return None
    return 1 / (Fraction(base) * stream.time_base)  # base_rate: the exact rate of a constant-rate stream


class _DecodeStopped(Exception):
    """FFmpeg reported an error or a corrupt frame: no more trustworthy frames in this file."""


def _decode(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Iterator[av.VideoFrame]:
    """Decoded frames, raising :class:`_DecodeStopped` at the first decode error or corrupt frame.

    Strict on purpose: decoding on after an error (as the ffmpeg tool does) yields smeared frames, silently.
    """
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.error.FFmpegError as e:
            raise _DecodeStopped(str(e).split(":")[0].strip().lower()) from None
        if frame.is_corrupt:
            raise _DecodeStopped("corrupt frame")
        yield frame


def _frames_after_seek(container, stream, target: int, step: Fraction) -> Iterator[tuple[int, av.VideoFrame]]:
    """Seek to the keyframe at or before frame ``target``; (index, frame) with the index from each frame's pts.

    Every index must sit on the grid and follow the previous one, else :class:`_Unreliable`.
    """
    start = stream.start_time
    try:
        container.seek(start + math.floor(target * step), stream=stream, backward=True)
    except av.error.FFmpegError:
        raise _Unreliable from None
    previous = None
    for frame in _decode(container, stream):
        if frame.pts is None:
            raise _Unreliable
        position = (frame.pts - start) / step
        index = round(position)
        if abs(position - index) > _PTS_TOLERANCE or (previous is not None and index != previous + 1):
            raise _Unreliable
        previous = index
        yield index, frame


def _indexed_frames(container, stream, first: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) from the keyframe before ``first`` when timestamps allow, else from the start (decode order).

    FFmpeg picks the keyframe by decode time, so with B-frames (and open GOPs, whose leading frames are dropped
    after a seek) it can land past ``first``: then seek again further back. Raises :class:`_Unreliable` when the
    timestamps disagree with index -> pts or no seek lands early enough.
    """
    step = _seek_step(stream) if first > 0 else None
    if step is None:
        yield from enumerate(_decode(container, stream))
        return
    for backoff in _SEEK_BACKOFF:
        if first - backoff <= 0:
            break
        frames = _frames_after_seek(container, stream, first - backoff, step)
        head = next(frames, None)
        if head is not None and head[0] <= first:
            yield head
            yield from frames
            return
        frames.close()
    raise _Unreliable


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None, scaler: VideoReformatter) -> np.ndarray:
    """(h, w, 3) uint8 RGB in display orientation, scaled by swscale to ``size`` (display width, height).

    ``scaler`` is reused across the frames of a read: a fresh swscale context per frame costs more than the scaling.
    swscale's bilinear (a filter widened by the scale factor, so downscaling is antialiased) is what decord's
    bundled FFmpeg 4 ``scale`` filter uses: the two readers agree to within 0.1 of 255 on average.
    """
    quarter_turns = round(frame.rotation / 90) % 4  # counter-clockwise, as np.rot90 counts
    if size is not None and quarter_turns % 2:
        size = (size[1], size[0])  # the decoder scales coded pixels: display (w, h) is coded (h, w)
    width, height = size if size is not None else (frame.width, frame.height)
    rgb = scaler.reformat(frame, width=width, height=height, format="rgb24", interpolation="BILINEAR").to_ndarray()
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


class PyAVReader:
    """FFmpeg through PyAV: seeks on regular timestamps, decodes at the requested size, handles every odd file."""

    name = "pyav"

    @staticmethod
    def available() -> bool:
        return True

    def read(self, path: str, indices: Sequence[int], size: tuple[int, int] | None) -> np.ndarray:
        wanted = set(indices)
        try:
            try:
                frames = self._collect(path, wanted, size, seek=True)
            except _Unreliable:
                frames = self._collect(path, wanted, size, seek=False)
        except _AV_FAILURES as e:  # anything else FFmpeg or swscale can raise on a strange file
            raise VideoReadError(path, _av_reason(e)) from None
        return np.stack([frames[i] for i in indices])  # n x (h w 3) -> n h w 3

    def _collect(self, path: str, wanted: set[int], size: tuple[int, int] | None, seek: bool) -> dict[int, np.ndarray]:
        container, stream = _open_video(path)
        first, last = min(wanted), max(wanted)
        frames: dict[int, np.ndarray] = {}
        scaler = VideoReformatter()
        seen = -1
        with container:
            try:
                for index, frame in _indexed_frames(container, stream, first if seek else 0):
                    seen = index
                    if index in wanted:
                        frames[index] = _to_rgb(frame, size, scaler)
                    if index >= last:
                        return frames
            except _DecodeStopped as e:
                raise VideoReadError(path, self._stopped_reason(stream, seen + 1, str(e))) from None
            raise VideoReadError(path, self._short_reason(container, stream, seen + 1, last))

    @staticmethod
    def _short_reason(container, stream, decoded: int, last: int) -> str:
        claimed = stream.frames or round((_duration_s(container, stream) or 0) * (_fps(stream) or 0))
        if claimed > decoded:
            return f"truncated: decoded {decoded} of {claimed} frames"
        return _too_short(last, decoded)

    @staticmethod
    def _stopped_reason(stream, decoded: int, detail: str) -> str:
        return f"corrupt: decoding failed after {decoded} of {stream.frames or '?'} frames ({detail})"


# --- decord ---------------------------------------------------------------------------------------------------------


def _decord_detail(error: Exception) -> str:
    """The last line of a decord error without its "[time] file.cc:line: " prefix, at most 120 characters."""
    lines = str(error).strip().splitlines()
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[-1])[:120] if lines else type(error).__name__


@functools.cache
def _decord_importable() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _rotation(path: str) -> int:
    """Display rotation in degrees counter-clockwise, from the first decoded frame (PyAV, ~1 ms)."""
    container, stream = _open_video(path)
    with container:
        try:
            return next(_decode(container, stream)).rotation
        except (StopIteration, _DecodeStopped):
            raise VideoReadError(path, "no decodable frame") from None


class DecordReader:
    """decord 0.6 (bundled FFmpeg 4), guarded against the mistakes it can be caught making.

    Caught here: 90/270 degree display rotation (decord returns a 4-channel array of garbage, or unrotated pixels
    when a size is given) is refused up front after a ~1 ms PyAV look at the first frame; output widths its
    buffers get wrong (8, 16, 24, 48, 72 ...) raise its own size-mismatch error; frames it cannot decode, which
    it would silently replace by the nearest one, are an error (``fault_tol``); the output shape is checked.
    NOT caught: on open-GOP streams (x265's default, x264 ``open-gop``) its seeks return frames 1-3 later than
    asked, for part of a clip only (temporal jitter, no error). Use it only on closed-GOP files you trust.
    """

    name = "decord"

    @staticmethod
    def available() -> bool:
        return _decord_importable()

    def read(self, path: str, indices: Sequence[int], size: tuple[int, int] | None) -> np.ndarray:
        import decord

        decord.logging.set_level(decord.logging.QUIET)  # failures are reported as VideoReadError instead
        if _rotation(path) % 180:
            raise VideoReadError(path, "decord: 90/270 degree rotation is not supported")
        width, height = size if size is not None else (-1, -1)
        try:
            video = decord.VideoReader(path, width=width, height=height, num_threads=1, fault_tol=1e-9)
            if max(indices) >= len(video):
                raise VideoReadError(path, _too_short(max(indices), len(video)))
            frames = video.get_batch(list(indices)).asnumpy()
        except VideoReadError:
            raise
        except Exception as e:  # DECORDError, RuntimeError, IndexError: decord's C++ errors
            raise VideoReadError(path, f"decord: {_decord_detail(e)}") from None
        expected = (len(indices), height, width, 3) if size is not None else (len(indices), *frames.shape[1:3], 3)
        if frames.shape != expected or frames.dtype != np.uint8:
            raise VideoReadError(path, f"decord: returned shape {frames.shape}, expected {expected}")
        return frames


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
    container, stream = _open_video(path)
    with container:
        try:
            first = next(_decode(container, stream))
        except (StopIteration, _DecodeStopped):
            raise VideoReadError(path, "no decodable frame") from None
        except _AV_FAILURES as e:
            raise VideoReadError(path, _av_reason(e)) from None
        fps = _fps(stream)
        duration = _duration_s(container, stream)
        num_frames = stream.frames or (round(duration * fps) if duration and fps else 0)
    num_frames = num_frames or max(1, _count_packets(path))  # the first frame decoded: at least one
    width, height = (first.height, first.width) if round(first.rotation / 90) % 2 else (first.width, first.height)
    return VideoInfo(num_frames=num_frames, fps=fps, width=width, height=height)


def probe(path: str | os.PathLike, *, timeout: float | None = 30.0) -> VideoInfo:
    """Frame count, frame rate and display size of a video from its headers and first frame (no full decode).

    Raises VideoReadError for anything that is not a readable video, including a truncated mp4 whose sample
    index points past the end of the file.
    """
    path = _check_file(path)
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
    path = _check_file(path)
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


def _image_to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: EXIF orientation applied, 16-bit scaled (not clipped), alpha dropped."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_MODES:
        white = _HIGH_BIT_MODES[image.mode]
        values = np.asarray(image, dtype=np.float64) * (255 / white)
        image = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def read_image(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as a one-frame clip: uint8 ``(1, h, w, 3)`` RGB, resized (bicubic) to ``size=(width, height)``."""
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (width, height) >= 1, got {size}")
    path = _check_file(path, sniff=False)
    try:
        with Image.open(path) as image:
            if size is not None:
                image.draft(image.mode, (max(size), max(size)))  # JPEG: decode at a reduced scale, >= size either way
            rgb = _image_to_rgb(image)
            if size is not None and rgb.size != tuple(size):
                rgb = rgb.resize(tuple(size), Image.Resampling.BICUBIC, reducing_gap=3.0)
            array = np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise VideoReadError(path, "file vanished") from None
    except UnidentifiedImageError:
        raise VideoReadError(path, "not an image") from None
    except Image.DecompressionBombError:
        raise VideoReadError(path, "image too large (decompression bomb guard)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise VideoReadError(path, f"truncated or corrupt image ({e})") from None
    return array[None]  # h w 3 -> 1 h w 3
