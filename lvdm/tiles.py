"""Overlapping windows: a model run over a video piece by piece, the pieces cross-faded where they overlap.

Used along time (a temporal VAE decoder over frame chunks) and along time and space together (the video upscaler
over frame chunks and spatial tiles, :func:`tiled`). Windows have a fixed size, are spread evenly from the first
position to the last and share at least ``overlap`` positions with the next (:func:`spans`); in a shared stretch the
two windows' weights rise and fall as raised cosines and sum to 1 (:func:`cross_fade`), so no seam shows. Where a
position is in a single window the result is that window's output exactly; a window as large as the video is the
whole model. Spatial tiles of a model with GroupNorms can share the frame's statistics (:mod:`lvdm.tile_norms`).

The ramps were linear until the demo's upscaler showed seams where they began and ended (the change across those
rows 2.4x and 1.9x the whole upscale's, against about 1x between other rows): a linear ramp's kink, and the weight
it gives a tile's first rows, where its zero padding is. Raised cosines: 1.1x and 1.0x.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lvdm.tile_norms import RecordedNorms, subsampled


def spans(length: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the fewest windows of ``window`` positions covering ``length``, each sharing at least
    ``overlap`` positions with the next, spread evenly from the first position to the last."""
    if overlap >= window:
        raise ValueError(f"overlap ({overlap}) must be smaller than the window ({window})")
    if length <= window:
        return [(0, length)]
    count = -(-(length - overlap) // (window - overlap))  # ceil
    starts = [round(i * (length - window) / (count - 1)) for i in range(count)]
    return [(start, start + window) for start in starts]


def cross_fade(n: int, before: int, after: int) -> torch.Tensor:
    """Weights of a window's ``n`` positions: rising over the ``before`` positions it shares with the previous
    window, falling over the ``after`` it shares with the next, 1 elsewhere; in a shared stretch the two windows'
    weights sum to 1. The ramps are raised cosines (``sin^2``): flat where they meet the plateau, so the blend has
    no kink there, and near 0 at a window's border, where a model that pads its input is least right."""
    weight = torch.ones(n)
    if before:
        weight[:before] = _rise(before)
    if after:
        weight[n - after :] = torch.minimum(weight[n - after :], 1 - _rise(after))
    return weight


def _rise(n: int) -> torch.Tensor:
    return torch.sin(torch.pi / 2 * torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)).square().float()


def span_weights(windows: list[tuple[int, int]]) -> list[torch.Tensor]:
    """:func:`cross_fade` weights of each of ``windows`` (as :func:`spans` gives them)."""
    weights = []
    for i, (begin, end) in enumerate(windows):
        before = windows[i - 1][1] - begin if i > 0 else 0
        after = end - windows[i + 1][0] if i + 1 < len(windows) else 0
        weights.append(cross_fade(end - begin, max(before, 0), max(after, 0)))
    return weights


def tiled(
    fn: Callable[..., torch.Tensor],
    window: Sequence[int | None],
    overlap: Sequence[int],
    *,
    scale: int = 1,
    norms: torch.nn.Module | None = None,
    multiple: int = 1,
    pooled: bool = False,
    passes: int = 1,
) -> Callable[..., torch.Tensor]:
    """``fn(x (b, c, f, h, w), *args, **kwargs)`` run window by window over ``(f, h, w)`` and cross-faded.

    ``window``: the size along frames, height and width (``None``: the whole extent); ``overlap``: the positions
    neighbouring windows share along each; ``scale``: ``fn``'s output is that many times larger in height and width
    (a decoder), its windows and weights scaled with it. Keyword tensors shaped like ``x`` in ``(f, h, w)``
    (per-position conditioning, e.g. a low-res video) are cut with ``x``; the others pass whole. ``norms``: the
    model ``fn`` runs, whose GroupNorms then normalise every tile of a frame window by statistics recorded in a run
    on the window subsampled to a tile's size, cropped to a multiple of ``multiple`` (:mod:`lvdm.tile_norms`);
    ``pooled``: every call runs the tiles twice, the first pass gathering the tiles' own statistics (weighted by
    their cross-fades) and the second normalising by them summed; the first pass normalises by the previous call's
    (the reference run's, or each tile's own where the frame is too thin to subsample, the first call), so the
    reference runs once; ``passes``: that many gathering passes before the last, each normalised by the statistics
    the one before it pooled (a layer's are right only once every layer's before it are: the passes carry that down
    the network). A pooled function keeps statistics from call to call: it serves one sampling run (make another
    for another video). The output is float32.
    """
    up = (1, scale, scale)
    kept: dict[tuple[Any, ...], RecordedNorms] = {}  # per frame window and input shape, from one call to the next

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        size = x.shape[2:]
        per_dim = []
        for length, win, lap in zip(size, window, overlap, strict=True):
            win = length if win is None else min(win, length)
            cuts = spans(length, win, min(lap, win - 1))
            per_dim.append(list(zip(cuts, span_weights(cuts), strict=True)))
        if all(len(cuts) == 1 for cuts in per_dim):
            return fn(x, *args, **kwargs).float()
        tile = (per_dim[1][0][0][1] - per_dim[1][0][0][0], per_dim[2][0][0][1] - per_dim[2][0][0][0])
        shared = norms is not None and tile != tuple(size[1:])  # tiles in space that share GroupNorm statistics
        reference = subsampled(tuple(size[1:]), tile, multiple) if shared else None

        def on(region: tuple[slice, ...]) -> torch.Tensor:  # fn on a window, its conditioning cut with it
            return fn(_cut(x, size, region), *args, **{key: _cut(v, size, region) for key, v in kwargs.items()})

        out = total = None
        for frames in per_dim[0]:
            key = (frames[0], tuple(x.shape))
            recorded = kept.get(key) or (RecordedNorms(norms) if reference or (pooled and shared) else None)
            if recorded and pooled:
                kept[key] = recorded
            with recorded or contextlib.nullcontext():
                if recorded and recorded.totals is None and reference:
                    stride, h, w = reference
                    region = (slice(*frames[0]), slice(0, h * stride, stride), slice(0, w * stride, stride))
                    recorded.record()
                    on(region)
                windows = list(enumerate(itertools.product([frames], *per_dim[1:])))
                for _ in range(passes if recorded and pooled else 0):  # gathering passes: each tile's statistics,
                    for i, pieces in windows:  # normalised by those pooled before (the previous call's, at first)
                        recorded.apply(i, _weight(pieces))
                        on(tuple(slice(begin, end) for (begin, end), _ in pieces))
                    recorded.pool()
                for i, pieces in windows:
                    region = tuple(slice(begin, end) for (begin, end), _ in pieces)
                    if recorded:
                        recorded.apply(i, _weight(pieces)) if pooled else recorded.apply()
                    out, total = _place(out, total, on(region).float(), pieces, size, up)
        return out / total

    return run


def _weight(pieces: Any) -> torch.Tensor:
    """A window's cross-fade weights over its (h, w)."""
    return pieces[1][1][:, None] * pieces[2][1][None, :]


def _place(
    out: torch.Tensor | None, total: torch.Tensor | None, part: torch.Tensor, pieces: Any, size: Any, up: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``part``, a window's output, added into ``out`` with its cross-fade weights, which are added to ``total``."""
    f_w, h_w, w_w = (weight.repeat_interleave(k).to(part.device) for (_, weight), k in zip(pieces, up, strict=True))
    weight = f_w[:, None, None] * h_w[None, :, None] * w_w[None, None, :]  # f h w
    placed = tuple(slice(begin * k, end * k) for ((begin, end), _), k in zip(pieces, up, strict=True))
    if out is None or total is None:
        out_size = [n * k for n, k in zip(size, up, strict=True)]
        out = torch.zeros(*part.shape[:2], *out_size, device=part.device)
        total = torch.zeros(*out_size, device=part.device)
    out[(slice(None), slice(None), *placed)] += part * weight
    total[placed] += weight
    return out, total


def _cut(value: Any, size: torch.Size, region: tuple[slice, ...]) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim == 5 and value.shape[2:] == size:
        return value[(slice(None), slice(None), *region)]
    return value
