"""Which frames of a video make a training clip, and at what frame rate.

Two modes: a fixed frame ``stride``, or a ``target_fps`` from which each video's frames are
picked by time (frame ``i`` of the clip is the source frame nearest ``start + i * fps / target_fps``),
so clips from 24, 30 and 60 fps sources all cover the same seconds of motion. The clip's
effective fps is returned with it; it feeds the FPS embedding.

Either may be a **range** ``(low, high)``, drawn per clip so that a model with FPS conditioning sees many
speeds: a stride uniformly among the integers ``low .. high``, a target rate log-uniformly in ``[low, high]`` (as
many clips between 4 and 8 fps as between 8 and 16: speed is a ratio). A draw only takes strides (rates) the video
is long enough for, so long strides do not turn short videos into bad samples; a video too short for the
smallest stride (the highest rate) is one. Held-out clips are not drawn: ``pick="low"`` / ``"high"`` takes the
range's lowest / highest clip rate that fits (the validation set alternates them, so the FPS gain always has two speeds
to tell apart).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from lvdm.errors import VideoReadError

Range = tuple[float, float]


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
    stride: int | Range | None = None,
    target_fps: float | Range | None = None,
    start: str = "random",
    rng: random.Random | None = None,
    pick: str = "draw",
) -> ClipPlan:
    """Choose ``num_frames`` frame indices from a video of ``num_video_frames`` frames.

    ``stride`` / ``target_fps``: one value, or a ``(low, high)`` range drawn per clip with ``rng`` (see the module
    notes); ``pick``: ``"draw"``, or ``"low"`` / ``"high"`` for the range's lowest / highest clip rate that fits.
    A video too short for the clip, or without a usable frame rate, is a :class:`VideoReadError` (a bad sample,
    replaced by the dataset).
    """
    if video_fps is None:
        raise VideoReadError(path, "frame rate missing or unusable")
    rng = rng or random.Random()
    step = _draw_step(video_fps, stride, target_fps, _longest_step(num_video_frames, num_frames), rng, pick)
    offsets = _offsets(step, num_frames)
    span = offsets[-1] + 1
    if span > num_video_frames:
        raise VideoReadError(
            path, f"too short: a {num_frames}-frame clip needs {span} frames, the video has {num_video_frames}"
        )
    first = _first_frame(num_video_frames - span, start, rng)
    return ClipPlan(tuple(first + o for o in offsets), fps=video_fps / step)


def _offsets(step: float, num_frames: int) -> list[int]:
    return [math.floor(i * step + 0.5) for i in range(num_frames)]


def _longest_step(num_video_frames: int, num_frames: int) -> float:
    """The largest source-frames-per-clip-frame step whose clip fits in the video (its span rounds like
    :func:`_offsets`)."""
    if num_frames < 2:
        return math.inf
    return (num_video_frames - 1 + 0.5 - 1e-9) / (num_frames - 1)


def _draw_step(
    video_fps: float,
    stride: int | Range | None,
    target_fps: float | Range | None,
    longest: float,
    rng: random.Random,
    pick: str = "draw",
) -> float:
    """Source frames per clip frame: the stride, or the fps ratio (never below 1: no duplicated frames); a range is
    drawn among the steps that fit (``<= longest``), the shortest step when none does (the caller reports it)."""
    if target_fps is not None:
        if not isinstance(target_fps, tuple):
            return max(1.0, video_fps / target_fps)
        low, high = target_fps
        # a higher rate is a shorter step: the rates that fit are >= video_fps / longest
        low = min(max(low, video_fps / longest), high)
        rate = _pick(pick, math.log(low), math.log(high), rng.uniform)
        return max(1.0, video_fps / math.exp(rate))
    if not isinstance(stride, tuple):
        return float(stride or 1)
    low, high = int(stride[0]), int(stride[1])
    high = max(low, min(high, math.floor(longest)))
    # the slowest motion is the shortest step: "low" (a rate's low end) is the stride's high end
    return float(_pick({"low": "high", "high": "low"}.get(pick, pick), low, high, rng.randint))


def _pick(pick: str, low: Any, high: Any, draw: Any) -> Any:
    if pick not in ("draw", "low", "high"):
        raise ValueError(f"pick must be draw, low or high, got {pick!r}")
    return draw(low, high) if pick == "draw" else low if pick == "low" else high


_STARTS = {
    "random": lambda slack, rng: rng.randint(0, slack),
    "center": lambda slack, rng: slack // 2,
}


def _first_frame(slack: int, start: str, rng: random.Random) -> int:
    if start not in _STARTS:
        raise ValueError(f"clip start {start!r}: choose one of {', '.join(_STARTS)}")
    return _STARTS[start](slack, rng)
