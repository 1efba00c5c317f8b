"""Writing what users look at: mp4, gif and PNG frames from uint8 ``(f, h, w, 3)`` RGB, every file written atomically.

mp4 is H.264 (libx264) through PyAV, tagged BT.709 (the RGB -> YUV conversion is done here with the same matrix,
so colours are right in every player). Even sizes use 4:2:0 (``yuv420p``), which plays everywhere. H.264 cannot
store an odd width or height in 4:2:0 (chroma is halved and the stream's crop rectangle moves in 2-pixel steps),
so odd sizes use 4:4:4 (``yuv444p``, High 4:4:4 profile): the exact size, played by FFmpeg-based players and
readers (VLC, mpv, Chrome, PyAV, decord) but not by Safari/QuickTime or most hardware decoders. Pick even sizes
for videos meant for phones or Apple devices.

The frame rate is stored exactly as a fraction: ``7.5`` -> 15/2, ``29.97`` -> 2997/100, ``30000 / 1001`` ->
30000/1001 (floats are read as the nearest fraction with a denominator up to 1001).
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import Colorspace
from PIL import Image

from lvdm.data import readers
from lvdm.errors import LvdmError
from lvdm.fileio import atomic_path
from lvdm.sampling_settings import MAX_FPS, MIN_FPS

Frames = np.ndarray | torch.Tensor
_BT709 = 1  # AVCOL_PRI_BT709 = AVCOL_TRC_BT709 = AVCOL_SPC_BT709
_MPEG_RANGE = 1  # AVCOL_RANGE_MPEG: limited range, what swscale writes for YUV


def _as_frames(frames: Frames) -> np.ndarray:
    """``frames`` as a C-contiguous uint8 numpy array ``(f, h, w, 3)``, or a ValueError saying what is wrong."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(
            f"frames must be uint8 (f, h, w, 3) RGB with f, h, w >= 1, got {frames.dtype} {tuple(frames.shape)}"
            " (to_uint8_frames converts a (f, 3, h, w) float video in [-1, 1])"
        )
    return np.ascontiguousarray(frames)


def _as_rate(fps: float | Fraction) -> Fraction:
    """``fps`` as a fraction; numpy's floats too (``Fraction`` refused ``np.float32(7.5)``: "must be in 0.01 .. 1000,
    got 7.5"). ``True`` is no rate."""
    rate, inexact = Fraction(0), isinstance(fps, numbers.Real) and not isinstance(fps, numbers.Rational)
    if not isinstance(fps, bool | np.bool_):
        try:
            rate = Fraction(float(fps) if inexact else fps).limit_denominator(1001)
        except (TypeError, ValueError, OverflowError):  # not a number, NaN, infinity
            pass
    if not MIN_FPS <= float(rate) <= MAX_FPS:
        raise ValueError(f"fps must be a number in {MIN_FPS} .. {MAX_FPS}, got {fps!r}")
    return rate


def _video_stream(container: av.container.OutputContainer, shape: tuple[int, ...], rate: Fraction, crf: int):
    _, height, width, _ = shape
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"  # see the module docstring
    stream.options = {"crf": str(crf)}
    context = stream.codec_context
    context.color_primaries = context.color_trc = context.colorspace = _BT709
    context.color_range = _MPEG_RANGE
    return stream


def write_video(
    frames: Frames, path: str | os.PathLike, *, fps: float | Fraction = 8.0, crf: int = 18, exclusive: bool = False
) -> Path:
    """Write an H.264 mp4 at the exact size and frame rate (see the module docstring for the pixel format).

    ``crf``: libx264 quality, 0 (lossless, poorly supported by players) to 51; 18 looks lossless to most eyes.
    ``exclusive``: never replace an existing ``path`` (:func:`lvdm.fileio.atomic_path`).
    """
    frames, rate = _as_frames(frames), _as_rate(fps)
    if type(crf) is not int or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an int in [0, 51], got {crf!r}")
    with atomic_path(path, exclusive=exclusive) as temp:
        with av.open(str(temp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = _video_stream(container, frames.shape, rate, crf)
            for index, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame = frame.reformat(format=stream.pix_fmt, dst_colorspace=Colorspace.ITU709)
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return Path(path)


def _gif_durations(count: int, rate: Fraction) -> list[int]:
    """Per-frame durations in ms, multiples of 10, whose running sum stays within 5 ms of ``i / fps``."""
    ends = [round(Fraction(100 * (i + 1)) / rate) for i in range(count)]  # in centiseconds
    return [10 * (end - start) for start, end in zip([0, *ends[:-1]], ends, strict=True)]


MAX_GIF_FPS = 100  # a GIF's delays are whole centiseconds


def gif_rate_problem(fps: float | None) -> str | None:
    """Why a GIF cannot play at ``fps`` (above :data:`MAX_GIF_FPS`), or None: for checks made before the frames
    are made (the writer refuses it only then)."""
    if fps is not None and fps > MAX_GIF_FPS:
        return f"a GIF stores delays in whole centiseconds, so at most {MAX_GIF_FPS} fps"
    return None


def write_gif(
    frames: Frames, path: str | os.PathLike, *, fps: float | Fraction = 8.0, loop: int = 0, exclusive: bool = False
) -> Path:
    """Write an animated GIF with Pillow (each frame quantized to its own 256-colour palette).

    GIF delays are whole centiseconds, so a frame lasts ``1000 / fps`` ms rounded to 10 ms; the durations alternate
    (e.g. 120/130 ms at 8 fps) so that the total length stays exact. Browsers play delays under 20 ms as 100 ms,
    so keep ``fps <= 50``. Pillow merges identical consecutive frames into one longer frame. ``loop=0`` repeats
    forever, ``loop=n`` plays n extra times.
    """
    frames, rate = _as_frames(frames), _as_rate(fps)
    durations = _gif_durations(len(frames), rate)
    if min(durations) == 0:
        raise ValueError(f"fps={fps} is too high for GIF: its delays are whole centiseconds (at most 100 fps)")
    images = [Image.fromarray(rgb) for rgb in frames]
    with atomic_path(path, exclusive=exclusive) as temp:
        images[0].save(temp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=loop)
    return Path(path)


def write_frames(
    frames: Frames, folder: str | os.PathLike, *, prefix: str = "frame", exclusive: bool = False
) -> list[Path]:
    """Write one PNG per frame, ``folder/{prefix}_00000.png`` ... (created if needed), each atomically.

    The frames replace an earlier write's (``exclusive``: an existing frame is an error instead): frames of a longer
    video written there before, named as this names them, are removed, so that the folder holds this video (an
    ``--overwrite`` with fewer frames kept the old ones past its end). Anything else in the folder is left.
    """
    frames = _as_frames(frames)
    paths = frame_paths(folder, len(frames), prefix=prefix)
    for path, rgb in zip(paths, frames, strict=True):
        with atomic_path(path, exclusive=exclusive) as temp:
            Image.fromarray(rgb).save(temp, format="PNG")
    named, written = re.compile(rf"{re.escape(prefix)}_\d{{5,}}\.png"), {path.name for path in paths}
    for entry in [] if exclusive else os.scandir(folder):
        if named.fullmatch(entry.name) and entry.name not in written and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
    return paths


def frame_paths(folder: str | os.PathLike, count: int, *, prefix: str = "frame") -> list[Path]:
    """The PNG files :func:`write_frames` writes for ``count`` frames: ``folder/{prefix}_00000.png`` ..."""
    digits = max(5, len(str(count - 1)))
    return [Path(folder) / f"{prefix}_{index:0{digits}d}.png" for index in range(count)]


MediaWriter = Callable[[Frames, Path, float | Fraction, bool], Path | list[Path]]
WRITERS: dict[str, MediaWriter] = {  # (frames, path, fps, exclusive)
    "mp4": lambda frames, path, fps, exclusive: write_video(frames, path, fps=fps, exclusive=exclusive),
    "gif": lambda frames, path, fps, exclusive: write_gif(frames, path, fps=fps, exclusive=exclusive),
    "png": lambda frames, folder, fps, exclusive: write_frames(frames, folder, exclusive=exclusive),  # no rate
}


def _kind(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    suffix = Path(text).suffix.lower().removeprefix(".")
    if text.endswith(("/", os.sep)) or not suffix:
        return "png"
    if suffix == "png" or suffix not in WRITERS:
        choices = ", ".join(f"'.{kind}'" for kind in WRITERS if kind != "png")
        raise ValueError(f"{text}: unknown media suffix '.{suffix}'; use {choices}, or a folder path for PNG frames")
    return suffix


def save_media(frames: Frames, path: str | os.PathLike, *, fps: float | Fraction = 8.0) -> Path | list[Path]:
    """Write ``frames`` by the path's suffix: ``.mp4``, ``.gif``, or PNG frames for a path without a suffix or
    ending in ``/`` (the list of files is returned). Another suffix is a ValueError listing the choices."""
    return WRITERS[_kind(path)](frames, Path(path), fps, False)


def sampled_frames(videos: torch.Tensor) -> np.ndarray:
    """Sampled videos ``(b, f, 3, h, w)`` in [-1, 1] as uint8 ``(b, f, h, w, 3)``. A non-finite value is a user's
    problem here (a guidance weight or threshold too large, a module with extreme weights): one clear error."""
    if not bool(torch.isfinite(videos).all()):
        raise LvdmError(
            "the sampled video holds NaN or infinite values: the model's predictions blew up; lower the guidance "
            "(--guidance) or its schedule's options, drop --threshold, or check the temporal module and LoRAs"
        )
    return np.stack([to_uint8_frames(clip.float().cpu()) for clip in videos])


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """A decoded video ``(f, 3, h, w)``, float in [-1, 1], as uint8 ``(f, h, w, 3)`` (rounded, clamped).

    A non-finite value is a ValueError: a NaN video is a bug upstream, not something to look at.
    """
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"video must be (f, 3, h, w), got {tuple(video.shape)}")
    video = video.detach().float()
    if not torch.isfinite(video).all():
        raise ValueError("video contains NaN or infinite values")
    pixels = ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # f c h w -> f h w c


def read_image(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as uint8 ``(h, w, 3)`` RGB, resized (bicubic) to ``size=(width, height)`` if given.

    The data pipeline's reader (:func:`lvdm.data.readers.read_image`), so images look the same here as in
    training: any Pillow mode (gray, palette, CMYK, 16-bit scaled, alpha dropped), EXIF orientation applied, and a
    :class:`~lvdm.errors.VideoReadError` naming the file when it cannot be read.
    """
    return readers.read_image(path, size=size)[0]  # 1 h w 3 -> h w 3
