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

**Pooled** (``frame_norms="pooled"``): the tiles' own statistics, weighted by their cross-fade weights (which sum to 1
at every position, so each position counts once) and summed, in a second pass over the tiles at every sampling step;
the first pass gathers them, normalised by the previous step's pooled statistics (the reference run's at the first
step). A layer's statistics are right only once those of every layer before it are, and the steps carry that on: the
statistics a step starts from are its predecessor's, nearly right. In the second pass each tile's fresh statistics
replace its first-pass ones in the sum as it runs (DistriFusion's corrected asynchronous GroupNorm, Li et al. 2024,
which uses the previous step's alone). Measured on the demo's upscaler (UNet in tiles, VAE whole; seeds 0 / 1;
whole-frame statistics as an oracle): 32 px in 16 px tiles 4.65 / 4.68 with the reference run, 3.64 / 3.65 pooled, 3.11
/ 3.14 oracle; 64 px in 32 px tiles 4.50 / 4.87, 2.58 / 2.48, 2.17 / 1.88. Without the first pass (the previous step's
statistics alone, with this tile's fresh ones) 64 px read 4.71 / 4.47: between two of 20 steps the statistics change
too much. **More gathering passes** (``passes``, the pipelines' ``norm_passes``), each normalised by the statistics the
one before pooled, carry the right statistics one layer group deeper each: on an x4 upscaler trained here on 128 px
patches (``benchmarks/tiles_experiment.py``; 64 px low-res frames in 32 px tiles, the UNet in tiles and the VAE whole,
image mode, one clip, seed 0), 2.48 with one pass, 1.54 with two, 0.62 with four, against 0.60 with the whole frame's
own statistics (an oracle), 2.82 with the reference run's and 3.23 with each tile's own; the sampler damps, not
amplifies, what is left (initial noise moved by 0.1 moves the result by 0.26). Tried before, and not kept: repeated
passes starting from each tile's own statistics (these start from the previous step's), within one call (the demo's
UNet 8.9 -> 27.9 after two passes).
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
        self.moments: dict[int, list[torch.Tensor]] = {}  # per tile, per call: weighted count, sum, sum of squares
        self.totals: list[torch.Tensor] | None = None  # per call: the tiles' moments summed (the frame's)
        self.current: tuple[int, torch.Tensor] | None = None  # the tile running and its cross-fade weights (h, w)

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

    def apply(self, tile: int | None = None, weight: torch.Tensor | None = None) -> None:
        """The next model run (and each after it, after another :meth:`apply`) normalises by the recorded ones;
        ``tile``, ``weight``: it is that tile, with these cross-fade weights over its (h, w), and its statistics are
        kept, so that once every tile has run (:meth:`pool`) runs normalise by the tiles' own, pooled."""
        expected = len(self.totals) if self.totals is not None else len(self.stats) if self.stats else self.index
        if not self.recording and self.index != expected:  # (no reference run and no totals yet: nothing to match)
            raise RuntimeError(f"a tile ran {self.index} GroupNorms where the earlier runs ran {expected}")
        self.recording, self.index = False, 0
        self.current = (tile, weight) if tile is not None and weight is not None else None
        if self.current and self.totals is None:
            self.moments[tile] = []

    def pool(self) -> None:
        """Every tile has run once: from then on a tile's run normalises by all tiles' statistics summed, as each
        last ran, its own replaced by its fresh ones as it goes (and no reference run is needed)."""
        if self.moments and self.totals is None:
            self.totals = [torch.stack(calls).sum(0) for calls in zip(*self.moments.values(), strict=True)]

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        n, c, groups = x.shape[0], x.shape[1], norm.num_groups
        positions = x.numel() // max(n * c, 1)
        if self.recording:  # the statistics GroupNorm itself computes (a run no larger than a tile)
            out, mean, rstd = torch.native_group_norm(x.contiguous(), norm.weight, norm.bias, n, c, positions, groups,
                                                      norm.eps)  # fmt: skip
            if positions * (c // groups) < MIN_GROUP_VALUES:  # too few values: each tile keeps its own
                self.stats.append(None)
                return out
            self.stats.append(_affine(norm, mean, rstd))  # made once for every tile
            return out
        if self.current is not None:
            tile, weight = self.current
            fresh = _moments(x, groups, weight)
            if self.totals is not None:  # pooled: this tile's fresh statistics replace its last ones in the sum
                if self.index >= len(self.totals) or fresh.shape != self.totals[self.index].shape:
                    raise RuntimeError(f"GroupNorm call {self.index} of a tile does not match the earlier runs'")
                self.totals[self.index] += fresh - self.moments[tile][self.index]
                self.moments[tile][self.index] = fresh
                total, self.index = self.totals[self.index], self.index + 1
                mean = total[..., 1] / total[..., 0]
                rstd = ((total[..., 2] / total[..., 0] - mean.square()).clamp(min=0) + norm.eps).rsqrt()
                return _scaled(x, *_affine(norm, mean, rstd))
            self.moments[tile].append(fresh)
            if not self.stats:  # no reference run (a frame too thin to subsample): each tile's own, this once
                self.index += 1
                return nn.functional.group_norm(x, groups, norm.weight, norm.bias, norm.eps)
        if self.index >= len(self.stats):
            raise RuntimeError(f"a tile ran more GroupNorms than the reference run's {len(self.stats)}")
        recorded, self.index = self.stats[self.index], self.index + 1
        if recorded is None:
            return nn.functional.group_norm(x, groups, norm.weight, norm.bias, norm.eps)
        if recorded[0].shape != (n, c):
            raise RuntimeError(f"GroupNorm call {self.index - 1} of a tile does not match the reference run's")
        return _scaled(x, *recorded)


def _moments(x: torch.Tensor, groups: int, weight: torch.Tensor) -> torch.Tensor:
    """Per sample and group of ``x`` (n, c, ..., h, w), or (n, c, h * w) tokens of an attention block: the
    weighted count, sum and sum of squares (n, groups, 3), float64, ``weight`` (over the tile's pixels) averaged
    down to ``x``'s (h, w)."""
    n, size = x.shape[0], tuple(x.shape[-2:])
    if x.ndim == 3:  # tokens: the frame's aspect ratio gives their (h, w); where it cannot, they weigh alike
        tokens = x.shape[2]
        h = max(round((tokens * weight.shape[0] / weight.shape[1]) ** 0.5), 1)
        size = (h, tokens // h) if tokens % h == 0 else (1, tokens)
        if tokens % h:
            weight = weight.new_full(size, float(weight.mean()))
    if weight.shape != size:
        weight = nn.functional.adaptive_avg_pool2d(weight[None, None], size)[0, 0]
    values = x.float().reshape(n, groups, -1, size[0] * size[1])
    weight = weight.to(values.device, values.dtype).reshape(-1)
    count = (weight.sum(dtype=torch.float64) * values.shape[2]).expand(n, groups)
    total = (values @ weight).sum(2, dtype=torch.float64)  # matmuls: one temporary copy of x (its square), not two
    squares = (values.square() @ weight).sum(2, dtype=torch.float64)
    return torch.stack([count, total, squares], dim=-1)


def _affine(norm: nn.GroupNorm, mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` (n, c) that normalise by a group's ``mean`` and ``rstd`` (n, groups) and
    apply the norm's affine weights."""
    per = norm.num_channels // norm.num_groups
    scale = rstd.float().repeat_interleave(per, dim=1)
    scale = scale * norm.weight.float() if norm.affine else scale
    shift = (norm.bias.float() if norm.affine else 0) - mean.float().repeat_interleave(per, dim=1) * scale
    return scale, shift


def _scaled(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per sample and channel, in one pass over ``x``."""
    shape = (*x.shape[:2], *[1] * (x.ndim - 2))
    return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


def subsampled(size: tuple[int, int], tile: tuple[int, int], multiple: int) -> tuple[int, int, int] | None:
    """``(stride, height, width)`` of the reference run for a frame of ``size`` in tiles of ``tile``: the smallest
    stride that makes the subsampled frame no larger than a tile, cropped down to multiples of ``multiple`` (what
    the model takes); ``None`` when nothing is left."""
    stride = max(-(-size[0] // tile[0]), -(-size[1] // tile[1]))
    h, w = (-(-n // stride) // multiple * multiple for n in size)
    return (stride, h, w) if h and w else None
