"""GroupNorm statistics of the whole frame for every tile of it, so tiles normalise alike.

A network run over tiles sees at each GroupNorm the statistics of its tile, not of the frame: a dark tile is
brightened, a flat one given contrast, and neighbouring tiles disagree far from their edges (the known colour shift
of tiled VAE decoding). Measured on the demo's x4 upscaler, 32x32 px low-res in 16 px tiles sharing 8 (linear
cross-fades then): the VAE decode in tiles differs from the whole decode by 9.0/255, 2.0 with the whole frame's
statistics recorded and given to every tile; the UNet's sampling in tiles by 8.9, 6.4 with the whole frame's.

The whole frame's statistics cannot be had without running the whole frame, which is what tiling avoids. They are
estimated from a **reference run** on the frame subsampled (every ``s``-th row and column, ``s`` the smallest
stride that makes it no larger than a tile): the same content at a coarser grid, its noise still of unit variance
(averaging would shrink it, and a denoiser's statistics follow the noise's). Every GroupNorm's statistics in that run
are recorded, and each tile's run normalises by them. On the demo that brings the VAE to 3.6/255 and the UNet to
5.6; the whole upscale, both tiled, with raised-cosine cross-fades: 12.4 -> 6.5 (seed 0), 13.2 -> 6.2 (seed 1), and
at 64x64 px in 32 px tiles 16.1 -> 11.0. What remains is the estimate and the tiles' zero-padded borders, not
attention: oracles on the demo (32 px in 16 px tiles) read 5.96 as is, 3.64 with the whole frame's own statistics,
3.18 with those and each tile attending to the whole frame's keys and values, 6.38 with the latter alone. Pooling
the statistics of all s * s subsampling phases (s times s reference runs) gave 5.88: the subsampled frame is the
picture at a coarser scale, and its statistics differ by that, not by sampling.

Tried first, and not kept: sharing the tiles' own statistics (weighted by their cross-fade weights) over repeated
passes. A layer's statistics are right only once every layer before it is, so that takes as many passes as the
model has GroupNorms (91 in the demo's UNet); in between, mixed statistics made tiles worse than their own (the
demo's UNet 8.9 -> 27.9 after two passes).
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn

# A reference run's group of fewer values than this gives each tile's run of that GroupNorm its own statistics: a
# variance of a few values can be near zero (on the tests' upscaler in 8 px tiles, 4 values per group at the deepest
# level, scales up to 127), and scaling another tile's values by it made latents 500x too large.
MIN_GROUP_VALUES = 16


class RecordedNorms:
    """While entered, every :class:`torch.nn.GroupNorm` of ``model`` records its statistics (after
    :meth:`record`, kept as the per-channel ``x * scale + shift`` they make) or normalises by those recorded, call
    by call in the same order (after :meth:`apply`)."""

    def __init__(self, model: nn.Module) -> None:
        self.norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # per call: scale, shift (n, c)
        self.recording = True
        self.index = 0

    def __enter__(self) -> RecordedNorms:
        self.saved = [norm.__dict__.get("forward") for norm in self.norms]  # a wrapper someone put there, if any
        for norm in self.norms:
            norm.forward = MethodType(self._forward, norm)  # an instance attribute: the class keeps its own
        return self

    def __exit__(self, *exc: Any) -> None:
        for norm, saved in zip(self.norms, self.saved, strict=True):
            if saved is None:
                del norm.forward
            else:
                norm.forward = saved

    def record(self) -> None:
        """The next model run records every GroupNorm's statistics."""
        self.stats, self.recording, self.index = [], True, 0

    def apply(self) -> None:
        """The next model run (and each after it, after another :meth:`apply`) normalises by the recorded ones."""
        if not self.recording and self.index != len(self.stats):
            raise RuntimeError(f"a tile ran {self.index} GroupNorms where the reference ran {len(self.stats)}")
        self.recording, self.index = False, 0

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        n, c, groups = x.shape[0], x.shape[1], norm.num_groups
        positions = x.numel() // max(n * c, 1)
        if self.recording:  # the statistics GroupNorm itself computes (a run no larger than a tile)
            out, mean, rstd = torch.native_group_norm(x.contiguous(), norm.weight, norm.bias, n, c, positions, groups,
                                                      norm.eps)  # fmt: skip
            if positions * (c // groups) < MIN_GROUP_VALUES:  # too few values: each tile keeps its own
                self.stats.append(None)
                return out
            scale = rstd.float().repeat_interleave(c // groups, dim=1)  # n c, made once for every tile
            scale = scale * norm.weight.float() if norm.affine else scale
            shift = (norm.bias.float() if norm.affine else 0) - mean.float().repeat_interleave(c // groups, 1) * scale
            self.stats.append((scale, shift))
            return out
        if self.index >= len(self.stats):
            raise RuntimeError(f"a tile ran more GroupNorms than the reference run's {len(self.stats)}")
        recorded, self.index = self.stats[self.index], self.index + 1
        if recorded is None:
            return nn.functional.group_norm(x, groups, norm.weight, norm.bias, norm.eps)
        scale, shift = recorded
        if scale.shape != (n, c):
            raise RuntimeError(f"GroupNorm call {self.index - 1} of a tile does not match the reference run's")
        shape = (n, c, *[1] * (x.ndim - 2))  # x * scale + shift, one pass over x
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


def subsampled(size: tuple[int, int], tile: tuple[int, int], multiple: int) -> tuple[int, int, int] | None:
    """``(stride, height, width)`` of the reference run for a frame of ``size`` in tiles of ``tile``: the smallest
    stride that makes the subsampled frame no larger than a tile, cropped down to multiples of ``multiple`` (what
    the model takes); ``None`` when nothing is left."""
    stride = max(-(-size[0] // tile[0]), -(-size[1] // tile[1]))
    h, w = (-(-n // stride) // multiple * multiple for n in size)
    return (stride, h, w) if h and w else None
