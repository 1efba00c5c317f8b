"""Classifier-free guidance around any ``model_fn``: weight schedules, guidance rescale, x0 thresholding.

Written by hand: diffusers inlines CFG in each pipeline (and its modular ``guiders`` expect the modular
pipeline's block state), and has no per-step weight schedules. This module runs the unconditional and
conditional passes as ONE batched call (batch ``2b``, unconditional half first), combines
``u + w(step) * (c - u)``, and skips the unconditional half entirely when ``w == 1``. Guidance rescale
(Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4) is diffusers'
own ``rescale_noise_cfg``. Weight schedules are callables ``(step_index, num_steps) -> w``, built by name
from :data:`GUIDANCE_SCHEDULES`; ``step_index`` 0 is the noisiest step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lvdm.diffusion._common import ModelFn, lookup


@dataclass(frozen=True)
class ConstantGuidance:
    """The same weight ``scale`` at every step (the usual CFG)."""

    scale: float

    def __call__(self, step_index: int, num_steps: int) -> float:
        return self.scale


@dataclass(frozen=True)
class OscillatingGuidance:
    """Imagen Video's oscillating guidance: ``scale`` for the first ``warmup`` fraction of the steps, then
    alternating ``scale, low, scale, low, ...``.

    Imagen Video (Ho et al. 2022, sec. 2.7) found that a constant high weight for the first steps followed by
    oscillation between a high and a low weight keeps the text alignment of a high weight while avoiding its
    saturation artefacts. The paper writes guidance as ``(1 + w) c - w u`` and alternates ``w = 15`` and ``w = 1``;
    lvdm writes it as ``u + s (c - u)``, so ``s = 1 + w``: Imagen's rule is ``scale=16, low=2`` here, and
    ``low=2`` is the default (``low=1`` would be no guidance at all on the low steps). E.g. 10 steps,
    ``warmup=0.2``: ``[s, s, s, 2, s, 2, s, 2, s, 2]``.
    """

    scale: float
    low: float = 2.0
    warmup: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1], got {self.warmup}.")

    def __call__(self, step_index: int, num_steps: int) -> float:
        first = math.floor(self.warmup * num_steps + 1e-6)  # warmup steps; the epsilon absorbs 0.29 * 100 = 28.99..
        if step_index < first or (step_index - first) % 2 == 0:
            return self.scale
        return self.low


@dataclass(frozen=True)
class LinearGuidance:
    """A linear ramp from ``low`` at the first (noisiest) step to ``scale`` at the last; reversed if
    ``increasing=False``.

    Increasing by default: the noisy early steps settle layout and motion, where a high weight mostly costs
    diversity and saturates colours, while the late steps add the detail that text alignment benefits from.
    Muse (Chang et al. 2023) ramps its guidance up over sampling for this reason, and Wang et al. 2024
    ("Analysis of Classifier-Free Guidance Weight Schedulers") found increasing schedules better than constant ones.
    """

    scale: float
    low: float = 1.0
    increasing: bool = True

    def __call__(self, step_index: int, num_steps: int) -> float:
        progress = step_index / (num_steps - 1) if num_steps > 1 else 1.0
        start, end = (self.low, self.scale) if self.increasing else (self.scale, self.low)
        return start + (end - start) * progress


GUIDANCE_SCHEDULES: dict[str, Callable[..., Callable[[int, int], float]]] = {
    "constant": ConstantGuidance,
    "oscillating": OscillatingGuidance,
    "linear": LinearGuidance,
}
"""Each entry takes ``(scale, **options)`` and returns a function ``(step_index, num_steps) -> weight``."""


def guidance_schedule(name: str, scale: float, **options: Any) -> Callable[[int, int], float]:
    """Build the named guidance schedule, e.g. ``guidance_schedule("oscillating", 16.0, low=2.0, warmup=0.2)``."""
    return lookup(GUIDANCE_SCHEDULES, name, "guidance schedule")(scale, **options)


def _join(values: list[Any], batch: int, key: str) -> Any:
    """One keyword of a batched call: tensors concatenated along dim 0 in order; anything else must be equal."""
    cond = values[-1]
    if isinstance(cond, torch.Tensor) and cond.ndim > 0:
        for value in values[:-1]:
            if not isinstance(value, torch.Tensor) or value.shape != cond.shape or cond.shape[0] != batch:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"cond[{key}] {tuple(cond.shape)} and a variant {got} need one shape, batch {batch}.")
        return torch.cat(values)
    if all(isinstance(v, Mapping) for v in values):
        return {k: _join([v.get(k, cond[k]) for v in values], batch, f"{key}.{k}") for k in cond}
    if all(isinstance(v, (list, tuple)) and len(v) == len(cond) for v in values):
        return type(cond)(_join([v[i] for v in values], batch, f"{key}[{i}]") for i in range(len(cond)))
    for value in values[:-1]:
        same = torch.equal(value, cond) if isinstance(cond, torch.Tensor) else value is cond or value == cond
        if not same:
            raise ValueError(f"cond[{key}] and a variant differ but are not batched tensors; they cannot be joined.")
    return cond


def stack_conditions(cond: Mapping[str, Any], variants: list[Mapping[str, Any]], batch: int) -> dict[str, Any]:
    """The keyword arguments of one call over ``len(variants) + 1`` copies of a batch: each variant, then ``cond``.

    Keys missing from a variant reuse ``cond``'s value (so a variant need only hold what differs: the empty text,
    the context left out); a key only in a variant is an error.
    """
    for variant in variants:
        extra = set(variant) - set(cond)
        if extra:
            raise ValueError(f"a guidance variant has keys that cond lacks: {sorted(extra)}.")
    return {key: _join([v.get(key, value) for v in variants] + [value], batch, key) for key, value in cond.items()}


def classifier_free_guidance(
    model_fn: ModelFn, *, scale_at: Callable[[int, int], float], rescale: float = 0.0
) -> Callable[..., torch.Tensor]:
    """Wrap ``model_fn`` into a guided model.

    The result is called as ``guided(x_t, t, *, cond, uncond, step_index, num_steps)`` with ``x_t``
    ``(b, c, f, h, w)``, ``t`` ``(b,)`` (or a scalar), ``cond``/``uncond`` keyword dicts for ``model_fn``
    (``uncond`` may be ``None`` when the weight is 1), and returns ``(b, c, f, h, w)`` in the model's dtype:
    ``u + w * (c - u)`` with ``w = scale_at(step_index, num_steps)``, then, if ``rescale > 0``, mixed with its
    std-matched version (phi = ``rescale``; 0.7 in the paper, meant for v-prediction models). When ``w == 1`` only
    the conditional pass runs.

    ``free`` (the keyword arguments of a pass without the context frames) with ``free_weight`` ``s != 1`` adds
    Video LDM's context guidance, ``+ (s - 1) * (c - f)`` (with ``w == 1``: ``f + s * (c - f)``), batched into the
    same forward: one model call per step, over ``3b`` with both guidances.

    ``image_only`` (the keyword arguments of a pass with the conditioning image but without the text) with
    ``image_weight`` ``w_i != w`` guides on the image and the text separately, as InstructPix2Pix does:
    ``u + w_i * (i - u) + w * (c - i)``, where ``u`` (``uncond``) has neither; with ``w_i == w`` that is plain
    guidance and the pass is not run.
    """

    def guided(
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None,
        step_index: int,
        num_steps: int,
        free: Mapping[str, Any] | None = None,
        free_weight: float = 1.0,
        image_only: Mapping[str, Any] | None = None,
        image_weight: float | None = None,
    ) -> torch.Tensor:
        b = x_t.shape[0]
        # () -> (b,)
        t = t.expand(b) if t.ndim == 0 else t
        weight = scale_at(step_index, num_steps)
        image = image_weight is not None and image_weight != weight
        if (weight != 1.0 or image) and uncond is None:
            raise ValueError(f"guidance weight {weight} at step {step_index} needs uncond.")
        if free_weight != 1.0 and free is None:
            raise ValueError(f"context guidance {free_weight} needs the context-free keyword arguments.")
        if image and image_only is None:
            raise ValueError(f"image guidance {image_weight} needs the image-only keyword arguments.")
        variants = {"uncond": uncond} if weight != 1.0 or image else {}
        variants |= {"image": image_only} if image else {}
        variants |= {"free": free} if free_weight != 1.0 else {}
        if not variants:
            return model_fn(x_t, t, **cond)
        n = len(variants) + 1
        out = model_fn(torch.cat([x_t] * n), torch.cat([t] * n), **stack_conditions(cond, list(variants.values()), b))
        # (n b, c, f, h, w) -> n x (b, c, f, h, w): the variants (unconditional first), the conditional last
        parts = dict(zip([*variants, "cond"], out.float().chunk(n), strict=True))
        out_cond = parts["cond"]
        pred = parts["uncond"] + weight * (out_cond - parts["uncond"]) if "uncond" in parts else out_cond
        if image:
            pred = pred + (image_weight - weight) * (parts["image"] - parts["uncond"])
        if free_weight != 1.0:
            pred = pred + (free_weight - 1.0) * (out_cond - parts["free"])
        if rescale > 0.0:
            # diffusers' own function, so the rescale is theirs to the bit; imported here, as diffusers.guiders
            # takes seconds to import and most runs do not rescale
            from diffusers.guiders.guider_utils import rescale_noise_cfg

            pred = rescale_noise_cfg(pred, out_cond, guidance_rescale=rescale)
        return pred.to(out.dtype)

    return guided


def _clamp(x0: torch.Tensor, value: float, bound: float) -> torch.Tensor:
    return x0.clamp(-value, value)


def _percentile(x0: torch.Tensor, value: float, bound: float) -> torch.Tensor:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"percentile thresholding takes a quantile in (0, 1], got {value}.")
    b = x0.shape[0]
    # b c f h w -> b (c f h w)
    flat = x0.float().abs().reshape(b, -1)
    # (b,) -> b 1 1 1 1
    s = torch.quantile(flat, value, dim=1).clamp(min=bound).view(b, *([1] * (x0.ndim - 1)))
    return (x0.float().clamp(-s, s) * (bound / s)).to(x0.dtype)


THRESHOLDS: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "clamp": _clamp,
    "percentile": _percentile,
}


def threshold_x0(x0: torch.Tensor, *, mode: str, value: float, bound: float = 1.0) -> torch.Tensor:
    """Limit a predicted clean sample ``x0`` ``(b, ...)``.

    ``"clamp"``: clip to ``[-value, value]``. ``"percentile"``: Imagen's dynamic thresholding per sample, with
    ``value`` the quantile (Imagen: 0.995): ``s = max(quantile(|x0|, value), bound)``, clip to ``[-s, s]`` and
    rescale into ``[-bound, bound]`` (multiply by ``bound / s``); samples whose quantile is within ``bound`` are
    unchanged. ``bound`` is used by percentile mode only; ``bound=1`` is Imagen's rule exactly.

    In Imagen these act in pixel space, where ``x0`` truly lies in ``[-1, 1]`` and thresholding restores that
    bound. SD latents (after ``scaling_factor``) have roughly unit std and no bound, so here both modes are only
    heuristics against blow-ups at high guidance weights, not the pixel-space constraint they are in Imagen. Clamp at
    a few stds (``value`` about 3-4). With ``bound=1`` percentile mode shrinks almost every latent (the 99.5th
    percentile of ``|N(0, 1)|`` is about 2.8); set ``bound`` to where latents are really out of range (about 3-4).
    """
    return lookup(THRESHOLDS, mode, "threshold mode")(x0, value, bound)
