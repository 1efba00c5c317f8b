"""Noise priors for training and sampling: independent, VideoFusion's mixed prior, offset noise.

Written by hand: diffusers only draws i.i.d. noise (``randn_tensor``, which this module uses for every
draw, so CPU generators work for CUDA tensors). The mixed prior (VideoFusion, Luo et al. 2023) shares
one base noise ``b`` of shape ``(b, c, 1, h, w)`` by all frames and adds a per-frame residual:

    eps_i = sqrt(lambda) * b + sqrt(1 - lambda) * r_i,    b, r_i ~ N(0, I)

so every element still has unit variance and two frames of a video correlate with coefficient
``lambda``. Fixing ``base_noise`` fixes the content a sampler starts from while the residual
(drawn from ``generator``) varies the motion.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from lvdm.diffusion._common import lookup


def _independent(
    shape: tuple[int, ...],
    *,
    mixed_lambda: float,
    base_noise: torch.Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """``N(0, I)`` per element."""
    if base_noise is not None:
        raise ValueError("base_noise is only used by prior='mixed'.")
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def _mixed(
    shape: tuple[int, ...],
    *,
    mixed_lambda: float,
    base_noise: torch.Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """VideoFusion: ``sqrt(l) * base + sqrt(1 - l) * residual``; base ``(b, c, 1, h, w)`` shared by the frames."""
    if len(shape) != 5:
        raise ValueError(f"prior='mixed' needs a (b, c, f, h, w) shape, got {tuple(shape)}.")
    if not 0.0 <= mixed_lambda <= 1.0:
        raise ValueError(f"mixed_lambda must be in [0, 1], got {mixed_lambda}.")
    b, c, _, h, w = shape
    if base_noise is not None and device is None:
        device = base_noise.device
    if base_noise is None:
        base_noise = randn_tensor((b, c, 1, h, w), generator=generator, device=device, dtype=torch.float32)
    elif tuple(base_noise.shape) != (b, c, 1, h, w):
        raise ValueError(f"base_noise must be (b, c, 1, h, w) = {(b, c, 1, h, w)}, got {tuple(base_noise.shape)}.")
    residual = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    base = base_noise.to(device=residual.device, dtype=torch.float32)
    return math.sqrt(mixed_lambda) * base + math.sqrt(1.0 - mixed_lambda) * residual


NOISE_PRIORS: dict[str, Callable[..., torch.Tensor]] = {
    "independent": _independent,
    "mixed": _mixed,
}
"""Each prior takes ``(shape, *, mixed_lambda, base_noise, generator, device)`` and returns float32 noise."""


def sample_noise(
    shape: tuple[int, ...],
    *,
    prior: str = "independent",
    mixed_lambda: float = 0.5,
    offset_noise: float = 0.0,
    base_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw diffusion noise of ``shape`` (``(b, c, f, h, w)`` for video) from a named prior.

    Args:
        shape: the latents' shape.
        prior: a key of :data:`NOISE_PRIORS`: ``"independent"`` or ``"mixed"`` (VideoFusion).
        mixed_lambda: the mixed prior's share of shared base noise, i.e. the correlation between two frames.
        offset_noise: if > 0, add ``offset_noise * n`` with ``n ~ N(0, 1)`` of shape ``(b, c, 1, 1, 1)``: one
            constant per video and channel, shared by all frames and pixels (Guttenberg's offset noise, which lets
            a model learn to change a clip's mean brightness). It raises the per-element variance to
            ``1 + offset_noise**2``; use it for training noise, not for the initial noise of a sampler.
        base_noise: the mixed prior's base ``(b, c, 1, h, w)``; ``None`` draws it from ``generator``.
        generator: the source of every draw, in order: base (if drawn), residual / independent noise, offset.
        device: where the result lives (a CPU generator draws on the CPU, then the noise is moved).
        dtype: the result's dtype (drawn and mixed in float32 first).

    Returns:
        Noise of ``shape`` on ``device`` in ``dtype``.
    """
    draw = lookup(NOISE_PRIORS, prior, "noise prior")
    shape = tuple(shape)
    noise = draw(shape, mixed_lambda=mixed_lambda, base_noise=base_noise, generator=generator, device=device)
    if offset_noise:
        # one value per (video, channel): b c 1 1 1 (for any number of trailing dims)
        offset_shape = shape[:2] + (1,) * (len(shape) - 2)
        offset = randn_tensor(offset_shape, generator=generator, device=noise.device, dtype=torch.float32)
        noise = noise + offset_noise * offset
    return noise.to(dtype)


def step_noise_for(prior: str, mixed_lambda: float = 0.5) -> Callable[..., torch.Tensor] | None:
    """The per-step noise of stochastic samplers under ``prior`` (``sample(step_noise=...)``); ``None`` for the
    independent prior, where the scheduler's own i.i.d. draws are already right."""
    lookup(NOISE_PRIORS, prior, "noise prior")
    if prior == "independent":
        return None
    return functools.partial(sample_noise, prior=prior, mixed_lambda=mixed_lambda)
