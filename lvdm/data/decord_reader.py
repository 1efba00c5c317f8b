"""The optional decord reader (``data.reader: decord``), guarded by what PyAV can check cheaply."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from lvdm.data.pyav_reader import DecodeStopped, decode_frames, open_video, too_short_reason
from lvdm.errors import VideoReadError


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
    container, stream = open_video(path)
    with container:
        try:
            return next(decode_frames(container, stream)).rotation
        except (StopIteration, DecodeStopped):
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
                raise VideoReadError(path, too_short_reason(max(indices), len(video)))
            frames = video.get_batch(list(indices)).asnumpy()
        except VideoReadError:
            raise
        except Exception as e:  # DECORDError, RuntimeError, IndexError: decord's C++ errors
            raise VideoReadError(path, f"decord: {_decord_detail(e)}") from None
        expected = (len(indices), height, width, 3) if size is not None else (len(indices), *frames.shape[1:3], 3)
        if frames.shape != expected or frames.dtype != np.uint8:
            raise VideoReadError(path, f"decord: returned shape {frames.shape}, expected {expected}")
        return frames
