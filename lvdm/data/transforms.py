"""Geometry of a training clip: the size to decode at, the crop, the flip, and aspect-ratio buckets.

Frames are decoded straight at the size that covers the target (the reader scales them), then
cropped, so no full-resolution frame is ever held. One crop box and one flip per clip.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

MAX_COVER = 16  # a frame decoded to cover the output holds at most this many times the output's pixels


def cover_size(width: int, height: int, out_h: int, out_w: int) -> tuple[int, int]:
    """``(w, h)`` to decode at: the smallest aspect-preserving scale that covers ``out_h x out_w``. A ``ValueError``
    when that takes more than ``MAX_COVER`` times the output's pixels: a 16x4096 video covering 512x512 decoded
    frames 131072 pixels tall, 200 MB each, to keep 1/256 of them."""
    scale = max(out_w / width, out_h / height)
    w, h = max(out_w, math.ceil(width * scale - 1e-6)), max(out_h, math.ceil(height * scale - 1e-6))
    if w * h > MAX_COVER * out_w * out_h:
        raise ValueError(
            f"{width}x{height} frames are too far from the {out_w}x{out_h} output's shape: covering it would mean "
            f"decoding {w}x{h} frames (at most {MAX_COVER} times the output's pixels are allowed; crop it first)"
        )
    return w, h


def crop_box(width: int, height: int, out_h: int, out_w: int, mode: str, rng: random.Random) -> tuple[int, int]:
    """Top-left ``(top, left)`` of an ``out_h x out_w`` crop: centred, or uniformly random."""
    if mode == "center":
        return (height - out_h) // 2, (width - out_w) // 2
    if mode == "random":
        return rng.randint(0, height - out_h), rng.randint(0, width - out_w)
    raise ValueError(f"crop mode {mode!r}: choose center or random")


def to_clip_tensor(frames: np.ndarray, out_h: int, out_w: int, *, crop: str, flip: bool, rng: random.Random):
    """``(f, h, w, 3)`` uint8 frames -> ``(f, 3, out_h, out_w)`` float in [-1, 1], cropped (and maybe flipped)."""
    _, height, width, _ = frames.shape
    top, left = crop_box(width, height, out_h, out_w, crop, rng)
    frames = frames[:, top : top + out_h, left : left + out_w]
    if flip and rng.random() < 0.5:
        frames = frames[:, :, ::-1]
    # f h w c -> f c h w (made contiguous: a permuted view is channels-last, which would follow the clip into the
    # VAE and the UNet)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    return video.float().div(127.5).sub(1.0)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The ``(h, w)`` bucket whose aspect ratio is closest (in log ratio) to the video's."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))
