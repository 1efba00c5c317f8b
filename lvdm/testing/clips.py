"""Synthetic media for tests, benchmarks and the demo: real encoded clips, captioned folders and bad inputs.

Everything is written in code with PyAV (no binaries are committed) and seeded. Two frame patterns:

- ``"shapes"``: a coloured disc or square moving smoothly across a dark gradient, the motion a video model can learn;
  its colour, shape and direction come from the seed and are what :func:`write_captioned_folder` captions say.
- ``"index"``: every frame shows its own index as a 2 x 6 grid of black/white blocks (12 bits, most significant
  first), big enough to survive H.264 and resizing; :func:`decode_index` reads it back, so a test can check that a
  reader returned exactly the frames it was asked for.

:data:`BAD_INPUTS` writes the broken and awkward files a scraped video folder contains; :data:`EXPECT_READABLE` says
which of them a reader must read (every frame the probe reports) and which must fail with a ``VideoReadError``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

INDEX_GRID = (2, 6)  # (rows, columns) of the "index" pattern: 12 bits, so indices 0..4095
_INDEX_BITS = INDEX_GRID[0] * INDEX_GRID[1]

_COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
}
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image coordinates
_SHAPES = ("disc", "square")


def _scene(seed: int) -> tuple[str, str, str]:
    """(colour, shape, direction) of the "shapes" pattern for ``seed``."""
    rng = np.random.default_rng(seed)
    colour = list(_COLOURS)[rng.integers(len(_COLOURS))]
    return colour, _SHAPES[rng.integers(len(_SHAPES))], list(_DIRECTIONS)[rng.integers(len(_DIRECTIONS))]


def caption_for(seed: int) -> str:
    """What a "shapes" clip written with ``seed`` shows, e.g. ``"a red disc moving left"``."""
    colour, shape, direction = _scene(seed)
    return f"a {colour} {shape} moving {direction}"


def _shapes_frames(num_frames: int, size: tuple[int, int], seed: int) -> Iterator[np.ndarray]:
    """A shape crossing the frame in a straight line over the whole clip, on a vertical dark gradient."""
    width, height = size
    colour, shape, direction = _scene(seed)
    dx, dy = _DIRECTIONS[direction]
    radius = max(1.0, min(width, height) / 5)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.empty((height, width, 3), np.uint8)
    background[...] = (20 + 60 * ys / max(height - 1, 1))[..., None].astype(np.uint8)  # h w -> h w 1, broadcast to 3
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1)  # 0 -> 1 across the clip
        cx = width / 2 + dx * (t - 0.5) * (width - 2 * radius)
        cy = height / 2 + dy * (t - 0.5) * (height - 2 * radius)
        if shape == "disc":
            inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
        else:
            inside = (abs(xs - cx) <= radius) & (abs(ys - cy) <= radius)
        frame = background.copy()
        frame[inside] = _COLOURS[colour]
        yield frame


def _index_frame(index: int, size: tuple[int, int]) -> np.ndarray:
    """One frame of the "index" pattern: bit k (MSB first) fills grid cell k white when set."""
    width, height = size
    rows, cols = INDEX_GRID
    frame = np.zeros((height, width, 3), np.uint8)
    for k in range(_INDEX_BITS):
        if (index >> (_INDEX_BITS - 1 - k)) & 1:
            r, c = divmod(k, cols)
            frame[r * height // rows : (r + 1) * height // rows, c * width // cols : (c + 1) * width // cols] = 255
    return frame


def _index_frames(num_frames: int, size: tuple[int, int], seed: int) -> Iterator[np.ndarray]:
    if num_frames > 2**_INDEX_BITS:
        raise ValueError(f"the index pattern holds at most {2**_INDEX_BITS} frames, got num_frames={num_frames}")
    return (_index_frame(i, size) for i in range(num_frames))


PATTERNS: dict[str, Callable[[int, tuple[int, int], int], Iterator[np.ndarray]]] = {
    "shapes": _shapes_frames,
    "index": _index_frames,
}


def decode_index(frame: np.ndarray) -> int:
    """The frame index drawn by the "index" pattern, from an ``(h, w, 3)`` uint8 frame.

    Each cell is read from its central half only, so block edges blurred by the codec or a resize do not matter:
    clips written at >= 32x16 read back exactly after H.264, also when decoded down to 12x6.
    """
    height, width = frame.shape[:2]
    rows, cols = INDEX_GRID
    gray = frame.astype(np.float32).mean(axis=2)  # h w 3 -> h w
    value = 0
    for k in range(_INDEX_BITS):
        r, c = divmod(k, cols)
        y0, y1 = r * height / rows, (r + 1) * height / rows
        x0, x1 = c * width / cols, (c + 1) * width / cols
        cell = gray[
            int(y0 + (y1 - y0) / 4) : int(np.ceil(y1 - (y1 - y0) / 4)),
            int(x0 + (x1 - x0) / 4) : int(np.ceil(x1 - (x1 - x0) / 4)),
        ]
        value = (value << 1) | int(cell.mean() > 127.5)
    return value


def _encode(
    path: Path,
    frames: Iterator[np.ndarray],
    *,
    fps: float,
    codec: str,
    pix_fmt: str,
    pts_ms: list[int] | None = None,
    rotation: int = 0,
    b_frames: bool = True,
    codec_options: dict[str, str] | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode RGB(A) frames into ``path`` (container from the suffix); ``pts_ms``: explicit (VFR) timestamps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate, options=codec_options or {})
        first = next(frames)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = pix_fmt
        stream.codec_context.gop_size = max(1, round(fps))  # a keyframe every second, so seeking has work to do
        if not b_frames:
            stream.codec_context.max_b_frames = 0
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, array in enumerate([first, *frames]):
            frame = av.VideoFrame.from_ndarray(array, format="rgba" if array.shape[2] == 4 else "rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_clip(
    path: str | os.PathLike,
    *,
    num_frames: int = 16,
    fps: float = 24.0,
    size: tuple[int, int] = (64, 48),
    pattern: str = "shapes",
    seed: int = 0,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    crf: int | None = None,
) -> Path:
    """Write a real video of ``num_frames`` frames of ``size`` (width, height) and return its path.

    The container follows the suffix (``.mp4``, ``.mov``, ``.webm``, ``.mkv``); ``pattern`` is a key of
    :data:`PATTERNS`. libx264 with yuv420p needs even sizes: for odd ones use ``pix_fmt="yuv444p"`` or
    ``codec="libvpx-vp9"`` (in ``.webm``). ``crf``: libx264's quality (``None``: its default); 0 is lossless, and
    the only setting whose decoded frames were the same from run to run on a busy machine (the encoder's choices,
    and so the lossy frames, varied).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {sorted(PATTERNS)}")
    frames = PATTERNS[pattern](num_frames, size, seed)
    options = {"crf": str(crf)} if crf is not None else None
    return _encode(Path(path), iter(frames), fps=fps, codec=codec, pix_fmt=pix_fmt, codec_options=options)


def write_captioned_folder(
    root: str | os.PathLike,
    n: int = 8,
    *,
    num_frames: int = 16,
    fps: float = 24.0,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
    crf: int | None = None,
) -> Path:
    """Write ``n`` "shapes" clips with same-name ``.txt`` captions under ``root``; every third one in ``nested/``.

    Clip ``i`` uses seed ``seed + i``; its caption is :func:`caption_for` of that seed. ``crf``: as :func:`write_clip`.
    """
    root = Path(root)
    for i in range(n):
        folder = root / "nested" if i % 3 == 2 else root
        path = folder / f"clip_{i:03d}.mp4"
        clip = write_clip(path, num_frames=num_frames, fps=fps, size=size, seed=seed + i, crf=crf)
        clip.with_suffix(".txt").write_text(caption_for(seed + i) + "\n", encoding="utf-8")
    return root


# --- bad and awkward inputs -----------------------------------------------------------------------------------------


def _good(directory: Path, name: str, **kwargs) -> Path:
    """A small index-pattern clip, the base that most bad inputs break in one way."""
    return write_clip(directory / name, **{"num_frames": 8, "pattern": "index", **kwargs})


def _truncated(percent: int) -> Callable[[Path], Path]:
    """A 64-frame faststart mp4 (index first, as web downloads are) cut to ``percent`` of its bytes."""

    def write(directory: Path) -> Path:
        path = directory / f"truncated_{percent}.mp4"
        _encode(
            path, _index_frames(64, (64, 48), 0), fps=24, codec="libx264", pix_fmt="yuv420p",
            options={"movflags": "faststart"},
        )  # fmt: skip
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * percent // 100])
        return path

    return write


def _truncated_webm(directory: Path) -> Path:
    """A 64-frame WebM cut in half: no sample index to check, the header still claims the full duration."""
    path = _encode(directory / "truncated_webm.webm", _index_frames(64, (64, 48), 0), fps=24, codec="libvpx-vp9",
                   pix_fmt="yuv420p")  # fmt: skip
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _zero_byte(directory: Path) -> Path:
    path = directory / "zero_byte.mp4"
    path.write_bytes(b"")
    return path


def _text_as_mp4(directory: Path) -> Path:
    path = directory / "text_as_mp4.mp4"
    path.write_text("<html><body>404 Not Found</body></html>\n" * 20, encoding="utf-8")
    return path


def _png_as_mp4(directory: Path) -> Path:
    path = directory / "png_as_mp4.mp4"
    Image.fromarray(_index_frame(3, (64, 48))).save(path, format="PNG")
    return path


def _audio_only(directory: Path) -> Path:
    """An AAC-only mp4: one second of a 440 Hz tone at 16 kHz."""
    path = directory / "audio_only.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        tone = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _mp4_boxes(data: bytearray, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the ISO-BMFF boxes in ``data[start:end]``, recursing into containers."""
    while start + 8 <= end:
        size, kind = int.from_bytes(data[start : start + 4], "big"), bytes(data[start + 4 : start + 8])
        yield kind, start + 8, start + size
        if kind in (b"moov", b"trak", b"edts", b"mdia", b"minf", b"stbl"):
            yield from _mp4_boxes(data, start + 8, start + size)
        start += size


_ZERO_TIMING = {  # box -> offsets (in its payload, version 0 layout) of the 4-byte fields to zero
    b"mvhd": (16,),  # duration
    b"tkhd": (20,),  # duration
    b"mdhd": (16,),  # duration
}


def _fps_0(directory: Path) -> Path:
    """An MPEG-4 part 2 mp4 with every sample duration (``stts``) and track/movie duration zeroed: no frame rate.

    MPEG-4 part 2 rather than H.264, whose stream headers would still tell FFmpeg the rate; written without
    B-frames, so the frames still decode in order: only the timing is gone, all timestamps are 0.
    """
    path = directory / "fps_0.mp4"
    _encode(path, _index_frames(8, (64, 48), 0), fps=24, codec="mpeg4", pix_fmt="yuv420p", b_frames=False)
    data = bytearray(path.read_bytes())
    for kind, payload, _ in _mp4_boxes(data, 0, len(data)):
        fields = list(_ZERO_TIMING.get(kind, ()))
        if kind == b"stts":  # entry_count, then (sample_count, sample_delta) pairs
            entries = int.from_bytes(data[payload + 4 : payload + 8], "big")
            fields = [payload + 8 + 8 * e + 4 - payload for e in range(entries)]
        if kind == b"elst":  # an edit list would re-introduce a duration
            data[payload - 4 : payload] = b"free"
        for offset in fields:
            data[payload + offset : payload + offset + 4] = bytes(4)
    path.write_bytes(bytes(data))
    return path


def _vfr(name: str, codec: str = "libx264") -> Callable[[Path], Path]:
    """24 frames at irregular intervals (20-120 ms): frame index must mean decode order, not time x fps (and in
    mkv and webm, which state no frame count, the count is not duration x rate)."""

    def write(directory: Path) -> Path:
        durations = [40, 40, 80, 20, 40, 120, 30, 50] * 3
        pts = [sum(durations[:i]) for i in range(len(durations))]
        frames = _index_frames(len(pts), (64, 48), 0)
        return _encode(directory / name, frames, fps=24, codec=codec, pix_fmt="yuv420p", pts_ms=pts)

    return write


def _alpha(directory: Path) -> Path:
    """Apple Animation (qtrle, argb) in .mov: index frames whose alpha fades from opaque (left) to clear (right)."""
    alpha = np.linspace(255, 0, 64).astype(np.uint8)[None, :, None].repeat(48, axis=0)  # w -> h w 1
    frames = (np.concatenate([f, alpha], axis=2) for f in _index_frames(8, (64, 48), 0))  # h w 3 -> h w 4
    return _encode(directory / "alpha.mov", frames, fps=24, codec="qtrle", pix_fmt="argb")


def _hevc_open_gop(directory: Path) -> Path:
    """120 frames of x265 with its defaults (open GOPs, B-frames), a keyframe every 24: what phones and re-encodes
    give, and where a reader that seeks by counting frames (decord) lands a few frames off."""
    frames = _index_frames(120, (64, 32), 0)
    options = {"x265-params": "keyint=24:log-level=error"}
    return _encode(directory / "hevc_open_gop.mp4", frames, fps=24, codec="libx265", pix_fmt="yuv420p",
                   codec_options=options)  # fmt: skip


def _unreadable(directory: Path) -> Path:
    path = _good(directory, "unreadable.mp4")
    path.chmod(0)
    return path


def _rotated(directory: Path) -> Path:
    """Coded 64x48, display matrix 90 degrees counter-clockwise: shown as 48x64."""
    frames = _index_frames(8, (64, 48), 0)
    return _encode(directory / "rotated.mp4", frames, fps=24, codec="libx264", pix_fmt="yuv420p", rotation=90)


BAD_INPUTS: dict[str, Callable[[Path], Path]] = {
    "zero_byte": _zero_byte,
    "truncated_10": _truncated(10),
    "truncated_50": _truncated(50),
    "truncated_99": _truncated(99),
    "truncated_webm": _truncated_webm,
    "text_as_mp4": _text_as_mp4,
    "png_as_mp4": _png_as_mp4,
    "audio_only": _audio_only,
    "one_frame": lambda d: _good(d, "one_frame.mp4", num_frames=1),
    "short": lambda d: _good(d, "short.mp4", num_frames=4),
    "fps_0": _fps_0,
    "fps_1000": lambda d: _good(d, "fps_1000.mp4", fps=1000.0),
    "vfr": _vfr("vfr.mp4"),
    "vfr_mkv": _vfr("vfr_mkv.mkv"),
    "vfr_webm": _vfr("vfr_webm.webm", codec="libvpx-vp9"),
    "tiny_8x8": lambda d: write_clip(d / "tiny_8x8.mp4", num_frames=4, size=(8, 8)),
    "tall_16x4096": lambda d: write_clip(d / "tall_16x4096.mp4", num_frames=2, size=(16, 4096)),
    "odd_size": lambda d: _good(d, "odd_size.webm", size=(33, 17), codec="libvpx-vp9"),  # VP9 4:2:0 allows odd
    "gray": lambda d: _good(d, "gray.mkv", codec="ffv1", pix_fmt="gray"),  # decodes to gray8 (H.264 4:0:0 would not)
    "alpha": _alpha,
    "ten_bit": lambda d: _good(d, "ten_bit.mp4", pix_fmt="yuv420p10le"),
    "rotated": _rotated,
    "hevc_open_gop": _hevc_open_gop,
    "unreadable": _unreadable,
    "space unicode path": lambda d: _good(d, "with space/vidéo ünï 動画.mp4"),
}
"""Each writer takes a directory, writes one bad or awkward file there and returns its path."""

EXPECT_READABLE: dict[str, bool] = {
    "zero_byte": False,
    "truncated_10": False,
    "truncated_50": False,
    "truncated_99": False,
    "truncated_webm": False,
    "text_as_mp4": False,
    "png_as_mp4": False,
    "audio_only": False,
    "one_frame": True,
    "short": True,
    "fps_0": True,
    "fps_1000": True,
    "vfr": True,
    "vfr_mkv": True,
    "vfr_webm": True,
    "tiny_8x8": True,
    "tall_16x4096": True,
    "odd_size": True,
    "gray": True,
    "alpha": True,
    "ten_bit": True,
    "rotated": True,
    "hevc_open_gop": True,
    "unreadable": False,
    "space unicode path": True,
}
"""True: every frame the probe reports can be read; False: probing or reading must raise ``VideoReadError``.

``"unreadable"`` (chmod 000) fails only for a non-root user: root reads it anyway."""
