"""Overlapping windows: a model run over a video piece by piece, the pieces cross-faded where they overlap.

Used along time (a temporal VAE decoder over frame chunks) and along time and space together (the video upscaler
over frame chunks and spatial tiles, :func:`tiled`). Windows have a fixed size, are spread evenly from the first
position to the last and share at least ``overlap`` positions with the next (:func:`spans`); in a shared stretch the
two windows' weights rise and fall linearly and sum to 1 (:func:`cross_fade`), so no seam shows. Where a position is
in a single window the result is that window's output exactly; a window as large as the video is the whole model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch


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
    weights sum to 1."""
    weight = torch.ones(n)
    if before:
        weight[:before] = torch.arange(1, before + 1, dtype=torch.float32) / (before + 1)
    if after:
        weight[n - after :] = torch.minimum(
            weight[n - after :], torch.arange(after, 0, -1, dtype=torch.float32) / (after + 1)
        )
    return weight


def span_weights(windows: list[tuple[int, int]]) -> list[torch.Tensor]:
    """:func:`cross_fade` weights of each of ``windows`` (as :func:`spans` gives them)."""
    weights = []
    for i, (begin, end) in enumerate(windows):
        before = windows[i - 1][1] - begin if i > 0 else 0
        after = end - windows[i + 1][0] if i + 1 < len(windows) else 0
        weights.append(cross_fade(end - begin, max(before, 0), max(after, 0)))
    return weights


def tiled(
    fn: Callable[..., torch.Tensor], window: Sequence[int | None], overlap: Sequence[int], *, scale: int = 1
) -> Callable[..., torch.Tensor]:
    """``fn(x (b, c, f, h, w), *args, **kwargs)`` run window by window over ``(f, h, w)`` and cross-faded.

    ``window``: the size along frames, height and width (``None``: the whole extent); ``overlap``: the positions
    neighbouring windows share along each; ``scale``: ``fn``'s output is that many times larger in height and width
    (a decoder), its windows and weights scaled with it. Keyword tensors shaped like ``x`` in ``(f, h, w)``
    (per-position conditioning, e.g. a low-res video) are cut with ``x``; the others pass whole. The output is
    float32.
    """
    up = (1, scale, scale)

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        size = x.shape[2:]
        per_dim = []
        for length, win, lap in zip(size, window, overlap, strict=True):
            win = length if win is None else min(win, length)
            cuts = spans(length, win, min(lap, win - 1))
            per_dim.append(list(zip(cuts, span_weights(cuts), strict=True)))
        if all(len(cuts) == 1 for cuts in per_dim):
            return fn(x, *args, **kwargs).float()
        out = total = None
        for pieces in itertools.product(*per_dim):
            region = tuple(slice(begin, end) for (begin, end), _ in pieces)
            cut = {key: _cut(value, size, region) for key, value in kwargs.items()}
            part = fn(x[(slice(None), slice(None), *region)], *args, **cut).float()
            f_w, h_w, w_w = (
                weight.repeat_interleave(k).to(part.device) for (_, weight), k in zip(pieces, up, strict=True)
            )
            weight = f_w[:, None, None] * h_w[None, :, None] * w_w[None, None, :]  # f h w
            placed = tuple(slice(begin * k, end * k) for ((begin, end), _), k in zip(pieces, up, strict=True))
            if out is None:
                out_size = [n * k for n, k in zip(size, up, strict=True)]
                out = torch.zeros(*part.shape[:2], *out_size, device=part.device)
                total = torch.zeros(*out_size, device=part.device)
            out[(slice(None), slice(None), *placed)] += part * weight
            total[placed] += weight
        return out / total

    return run


def _cut(value: Any, size: torch.Size, region: tuple[slice, ...]) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim == 5 and value.shape[2:] == size:
        return value[(slice(None), slice(None), *region)]
    return value
