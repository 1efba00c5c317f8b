"""Which frames of a video make a training clip, and at what frame rate.

Two modes: a fixed frame ``stride``, or a ``target_fps`` from which each video's frames are
picked by time (frame ``i`` of the clip is the source frame nearest ``start + i * fps / target_fps``),
so clips from 24, 30 and 60 fps sources all cover the same seconds of motion. The clip's
effective fps is returned with it; it feeds the FPS embedding.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from lvdm.errors import VideoReadError


@dataclass(frozen=True)
class ClipPlan:
    """Frame indices to decode and the frame rate the clip plays at."""

    indices: tuple[int, ...]
    fps: float


def plan_clip(
    path: str,
    num_video_frames: int,
    video_fps: float | None,
    num_frames: int,
    *,
    stride: int | None = None,
    target_fps: float | None = None,
    start: str = "random",
    rng: random.Random | None = None,
) -> ClipPlan:
    """Choose ``num_frames`` frame indices from a video of ``num_video_frames`` frames.

    A video too short for the clip, or without a usable frame rate, is a :class:`VideoReadError`
    (a bad sample, replaced by the dataset).
    """
    if video_fps is None:
        raise VideoReadError(path, "frame rate missing or unusable")
    step = _step(video_fps, stride, target_fps)
    offsets = [math.floor(i * step + 0.5) for i in range(num_frames)]
    span = offsets[-1] + 1
    if span > num_video_frames:
        raise VideoReadError(
            path, f"too short: a {num_frames}-frame clip needs {span} frames, the video has {num_video_frames}"
        )
    first = _first_frame(num_video_frames - span, start, rng)
    return ClipPlan(tuple(first + o for o in offsets), fps=video_fps / step)


def _step(video_fps: float, stride: int | None, target_fps: float | None) -> float:
    """Source frames per clip frame: the stride, or the fps ratio (never below 1: no duplicated frames)."""
    if target_fps is not None:
        return max(1.0, video_fps / target_fps)
    return float(stride or 1)


_STARTS = {
    "random": lambda slack, rng: (rng or random.Random()).randint(0, slack),
    "center": lambda slack, rng: slack // 2,
}


def _first_frame(slack: int, start: str, rng: random.Random | None) -> int:
    if start not in _STARTS:
        raise ValueError(f"clip start {start!r}: choose one of {', '.join(_STARTS)}")
    return _STARTS[start](slack, rng)
