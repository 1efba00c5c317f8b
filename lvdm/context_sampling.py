"""Sampling with context frames: continuing a video, long videos by rollout, interpolation (Video LDM sec. 3.1.1).

A temporal module trained with ``model.context`` (see :mod:`lvdm.training.tasks`) takes given frames through its
context encoder. :class:`~lvdm.VideoPipeline` uses this module for three things:

- **continue** a video (``pipe(prompt, context=frames_or_file)``): new frames conditioned on its last
  ``context_frames`` frames;
- **rollout** (``num_frames`` beyond the module's training length ``T``): a first chunk of ``T`` frames from
  text (or from the given context), then chunk after chunk conditioned on the last ``context_frames`` frames made.
  No model call ever sees more than ``T`` frames, so memory stays flat in the length; the frames are decoded
  chunk by chunk at the end;
- **interpolate** a video by 4 (``pipe.interpolate(frames_or_file, factor=4)``): ``k`` keyframes become
  ``4 (k - 1) + 1`` frames, window by window (each window holds keyframes at 0, 4, 8, ... and fits in ``T``);
  16 is 4 twice. The keyframes come back unchanged, latents and pixels.

Given frames are held exactly: before every denoising step they are set to their latents noised to that step's
level (the way the model saw them in training), and at the end to the latents themselves
(:class:`~lvdm.diffusion.KnownFrames`). **Context guidance** ``s`` (``context_guidance``) extrapolates from the
pass without the given frames, ``f(z) + s (f(z; c) - f(z))``, in the same batched forward as the text guidance.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvdm.errors import ConfigError

FACTORS = (4, 16)
STEP = 4  # one interpolation pass makes 3 frames between each pair of keyframes

NO_CONTEXT = (
    "this temporal module has no context support (it was trained without model.context), so it cannot {what}; "
    "train one with model.context=true and train.tasks={{text: 1, predict: 1, interpolate: 1}} "
    "(configs/demo_context.yaml shows how)"
)


@dataclass(frozen=True)
class ContextVideo:
    """Frames given by the user, as the model takes them."""

    frames: np.ndarray  # uint8 (f, h, w, 3) at the sampling size
    fps: float | None  # the file's frame rate, where known
    resized: str | None  # "WxH -> wxh, centre crop" when the frames were resized


def read_context(source: Any, height: int, width: int, *, what: str = "context") -> ContextVideo:
    """Frames from a video file, a folder-less image file, or a uint8 array ``(f, h, w, 3)``, resized to cover
    ``height x width`` and centre-cropped (as training clips are); a clear error for anything else."""
    from lvdm.data.transforms import cover_size

    fps = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{what} video {path} does not exist or is not a file")
        from lvdm.data.readers import probe, read_frames
        from lvdm.errors import LvdmError

        try:
            info = probe(path)
            size = cover_size(info.width, info.height, height, width)
            frames = read_frames(path, range(info.num_frames), size=size)
        except LvdmError as exc:
            raise ConfigError(f"{what} video {path}: {exc}") from exc
        fps, original = info.fps, (info.width, info.height)
    else:
        frames = np.asarray(source)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ConfigError(f"{what} frames must be uint8 (f, h, w, 3), got {frames.dtype} {tuple(frames.shape)}")
        original = (frames.shape[2], frames.shape[1])
        size = cover_size(original[0], original[1], height, width)
        if size != original:
            from PIL import Image

            frames = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])
    top, left = (frames.shape[1] - height) // 2, (frames.shape[2] - width) // 2
    frames = np.ascontiguousarray(frames[:, top : top + height, left : left + width])
    resized = None if original == (width, height) else f"{original[0]}x{original[1]} -> {width}x{height}, centre crop"
    return ContextVideo(frames, fps, resized)


@torch.no_grad()
def encode_frames(vae: Any, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``(f, h, w, 3)`` -> scaled latents ``(1, c, f, h', w')`` (the posterior mean: deterministic)."""
    from lvdm.data.transforms import to_clip_tensor
    from lvdm.models.encoders import encode_video

    h, w = frames.shape[1:3]
    video = to_clip_tensor(frames, h, w, crop="center", flip=False, rng=random.Random(0))[None]
    mean = encode_video(vae, video.to(device)).float().chunk(2, dim=1)[0]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean - shift) * vae.config.scaling_factor


def rollout_chunks(total: int, length: int, given: int, context_frames: int) -> list[tuple[int, int]]:
    """``(given, new)`` frame counts of each chunk making ``total`` new frames with chunks of at most ``length``
    frames: the first conditioned on ``given`` frames (0: from text), then each on ``context_frames``."""
    if length <= context_frames:
        raise ConfigError(
            f"context_frames={context_frames} leaves no new frame in a {length}-frame chunk; use fewer context frames"
        )
    chunks, made = [], 0
    known = given
    while made < total:
        new = min(length - known, total - made)
        chunks.append((known, new))
        made += new
        known = context_frames
    return chunks


def interpolation_windows(num_keyframes: int, length: int) -> list[tuple[int, int]]:
    """``(start, end)`` windows over the ``4 (k - 1) + 1`` output frames of one pass, each starting and ending on a
    keyframe and at most ``length`` frames long."""
    span = STEP * ((length - 1) // STEP)  # output frames between a window's first and last keyframe
    if span < STEP:
        raise ConfigError(
            f"this module was trained on {length}-frame clips; interpolating by {STEP} needs windows of at least "
            f"{STEP + 1} frames (train with data.num_frames >= {STEP + 1})"
        )
    total = STEP * (num_keyframes - 1) + 1
    return [(start, min(start + span, total - 1) + 1) for start in range(0, total - 1, span)]
