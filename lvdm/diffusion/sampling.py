"""Sampling: named diffusers schedulers and one loop around any ``model_fn``.

The schedulers are diffusers' own, built with ``from_config`` from the base model's scheduler config, so betas
and ``prediction_type`` follow the base. Note ``from_config`` only carries over the values the base config set
explicitly: a key the base left at its default (listed in ``config["_use_default_values"]``) takes the new
scheduler's own default (e.g. ``timestep_spacing`` "leading" for DDIM/DDPM, "linspace" for Euler/DPM/UniPC).

Written by hand: the loop itself (diffusers' is inside each pipeline and calls the UNet directly), with
classifier-free guidance from :mod:`lvdm.diffusion.guidance` and optional thresholding of the predicted x0 for
every scheduler (diffusers' own ``thresholding`` exists only in some schedulers and only as the percentile rule).

Stochastic samplers (``ddpm``, ``euler_a``, DDIM with eta > 0) add fresh noise at every step. Under a video
noise prior that noise must follow the prior too, or each step would add i.i.d. per-frame noise and undo the
shared part of VideoFusion's mixed prior. diffusers' ``step`` offers no way to pass that noise in (only DDIM
takes ``variance_noise``), so :func:`sample` with ``step_noise`` makes the scheduler's module draw through it for
the duration of each ``step`` call (its ``randn_tensor``, the one function every diffusers scheduler draws
with); a scheduler module without one is refused rather than silently sampled with i.i.d. noise. Not thread-safe
across concurrent sampling loops with different priors on one scheduler class.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin
from tqdm.auto import tqdm

from lvdm.diffusion._common import ModelFn, lookup
from lvdm.diffusion.guidance import ConstantGuidance, classifier_free_guidance, threshold_x0
from lvdm.errors import ConfigError

Threshold = tuple[str, float] | Callable[[torch.Tensor], torch.Tensor]
StepNoise = Callable[..., torch.Tensor]  # (shape, *, generator, device) -> float32 noise

SAMPLERS: dict[str, Callable[[Mapping[str, Any]], SchedulerMixin]] = {
    "ddim": DDIMScheduler.from_config,
    # DDIM on a grid that starts at the last training timestep (SD's "leading" grid starts at 1000 - 1000/n + 1,
    # which at 4 steps leaves a quarter of the noise unseen): what distilled few-step students use
    "ddim_trailing": functools.partial(DDIMScheduler.from_config, timestep_spacing="trailing"),
    "dpmpp": functools.partial(DPMSolverMultistepScheduler.from_config, algorithm_type="dpmsolver++"),
    "euler": EulerDiscreteScheduler.from_config,
    "euler_a": EulerAncestralDiscreteScheduler.from_config,
    "ddpm": DDPMScheduler.from_config,
    "unipc": UniPCMultistepScheduler.from_config,
}
"""Each entry builds a fresh diffusers scheduler from a base scheduler's ``config``."""


LATENT_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False}
"""SD's own values for what a base's scheduler config may leave unstated (a config saved from an Euler or DPM
scheduler by diffusers carries no ``clip_sample``). DDIM's and DDPM's defaults are pixel-space ones: they clip the
predicted clean latents to [-1, 1], which destroys SD latents (their spread is about 1), and end DDIM at alpha 1."""


def make_scheduler(name: str, base_config: Mapping[str, Any] | ConfigMixin) -> SchedulerMixin:
    """The :data:`SAMPLERS` scheduler ``name`` built from ``base_config`` (a scheduler or its ``.config``), with
    :data:`LATENT_DEFAULTS` where the base config does not state them.

    Unknown names raise ``ValueError`` with the choices and a did-you-mean.
    """
    factory = lookup(SAMPLERS, name, "sampler")
    config = base_config.config if isinstance(base_config, ConfigMixin) else base_config
    stated = set(config) - set(config.get("_use_default_values", ()))
    # built once: from_config drops (unrecorded) a keyword its scheduler does not take, so Euler ignores clip_sample
    return factory(config, **{key: value for key, value in LATENT_DEFAULTS.items() if key not in stated})


def _grid_fault(scheduler: SchedulerMixin, steps: int) -> str | None:
    """What is wrong with ``scheduler``'s timesteps for ``steps`` (``None``: nothing), on a fresh copy of it."""
    fresh = type(scheduler).from_config(scheduler.config)
    try:
        fresh.set_timesteps(steps)
    except (ValueError, IndexError, AssertionError) as exc:
        return str(exc)
    t, last = fresh.timesteps.float(), scheduler.config.num_train_timesteps - 1
    if t.min() < 0 or t.max() > last:
        return f"its timesteps would reach {t.min() if t.min() < 0 else t.max():.0f} (the schedule has 0 .. {last})"
    if len(t) > 1 and not bool((t[1:] < t[:-1]).all()):
        return "it would repeat a timestep"
    return None


def check_steps(scheduler: SchedulerMixin, steps: int) -> None:
    """Refuse a step count the sampler cannot lay out on the base's schedule, naming the most it can, before any
    model call: with SD's "leading" spacing and ``steps_offset`` 1, 1000 steps put diffusers' DDIM, Euler and
    DDPM at timestep 1000, past the schedule's end, and DPM-Solver++ and UniPC fail from 999 steps."""
    fault = _grid_fault(scheduler, steps)
    if fault is None:
        return
    most = next((n for n in range(steps - 1, 0, -1) if _grid_fault(scheduler, n) is None), None)
    sampler = type(scheduler).__name__
    allowed = f"use at most {most}" if most else "no step count works: check the base's scheduler_config.json"
    raise ConfigError(f"{steps} steps do not fit {sampler} on this base's schedule: {fault}; {allowed}")


# model output <-> predicted x0, given the model's input x_t and alpha_bar_t (all float32)
_TO_X0: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "epsilon": lambda out, x_t, a: (x_t - (1 - a).sqrt() * out) / a.sqrt(),
    "v_prediction": lambda out, x_t, a: a.sqrt() * x_t - (1 - a).sqrt() * out,
    "sample": lambda out, x_t, a: out,
}
_FROM_X0: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "epsilon": lambda x0, x_t, a: (x_t - a.sqrt() * x0) / (1 - a).sqrt(),
    "v_prediction": lambda x0, x_t, a: (a.sqrt() * x_t - x0) / (1 - a).sqrt(),
    "sample": lambda x0, x_t, a: x0,
}


def predicted_x0(prediction_type: str, out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The clean latents a model output of ``prediction_type`` implies at ``x_t`` (``alpha_bar`` broadcastable)."""
    return lookup(_TO_X0, prediction_type, "prediction_type")(out, x_t, alpha_bar)


def _alpha_bar(scheduler: SchedulerMixin, t: torch.Tensor) -> torch.Tensor:
    """``alpha_bar`` at a (possibly fractional) timestep, as a float32 scalar.

    Integer timesteps read ``alphas_cumprod``; fractional ones (Euler schedulers) interpolate sigma linearly
    between training timesteps, as those schedulers do (approximate with Karras sigmas).
    """
    alphas = scheduler.alphas_cumprod.double().cpu().numpy()
    sigmas = ((1 - alphas) / alphas) ** 0.5
    sigma = np.interp(float(t), np.arange(len(sigmas)), sigmas)
    return torch.tensor(1.0 / (1.0 + sigma**2), dtype=torch.float32)


def _limit_output(
    scheduler: SchedulerMixin, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, limit: Callable
) -> torch.Tensor:
    """Threshold the x0 that ``out`` implies, and return the model output that implies the thresholded x0."""
    kind = scheduler.config.prediction_type
    a = _alpha_bar(scheduler, t).to(x_t.device)
    x_t = x_t.float()
    x0 = limit(predicted_x0(kind, out.float(), x_t, a))
    return _FROM_X0[kind](x0, x_t, a).to(out.dtype)


def _limiter(threshold: Threshold | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if threshold is None or callable(threshold):
        return threshold
    mode, value = threshold
    return functools.partial(threshold_x0, mode=mode, value=value)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    scheduler: SchedulerMixin,
    *,
    latents: torch.Tensor,
    num_inference_steps: int,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    guidance: Callable[[int, int], float] | None = None,
    guidance_rescale: float = 0.0,
    threshold: Threshold | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    step_noise: StepNoise | None = None,
    known: KnownFrames | None = None,
    context_free: Mapping[str, Any] | None = None,
    context_guidance: float = 1.0,
    image_only: Mapping[str, Any] | None = None,
    image_guidance: float | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Denoise ``latents`` with ``scheduler`` and the (guided) ``model_fn``; returns the clean latents.

    Runs under ``torch.no_grad()``. Each step: ``scale_model_input``, one guided model call (batch ``2b`` when the
    step's guidance weight is not 1), optional x0 thresholding, ``scheduler.step``.

    Args:
        model_fn: ``model_fn(x_t, t, **cond) -> (b, c, f, h, w)`` in the scheduler's prediction type. ``t`` is
            ``(b,)`` with the scheduler's timestep dtype: long, except float32 for the Euler samplers (their
            timesteps may fall between training timesteps; a diffusers UNet takes both).
        scheduler: a diffusers scheduler, e.g. from :func:`make_scheduler`; ``set_timesteps`` is called here.
        latents: the initial noise ``(b, c, f, h, w)`` at unit variance (drawn by the caller, e.g. with
            :func:`~lvdm.diffusion.noise.sample_noise`); it is scaled by ``init_noise_sigma`` here.
        num_inference_steps: denoising steps.
        cond: keyword arguments of the conditional pass (``encoder_hidden_states`` ...).
        uncond: those of the unconditional pass (only what differs from ``cond``); needed with ``guidance``.
        guidance: a weight schedule ``(step_index, num_steps) -> w`` (see
            :func:`~lvdm.diffusion.guidance.guidance_schedule`); ``None`` runs the conditional model only.
        guidance_rescale: phi of Lin et al. 2023 guidance rescale; 0 disables it.
        threshold: ``(mode, value)`` for :func:`~lvdm.diffusion.guidance.threshold_x0`, or any ``x0 -> x0``
            callable, applied to the x0 implied by each (guided) model output; ``None`` disables it.
        generator: passed to ``scheduler.step`` where it takes one (the noise of DDPM, Euler ancestral, DDIM with
            eta > 0).
        step_noise: ``(shape, *, generator, device) -> noise`` drawing the per-step noise of stochastic samplers
            (e.g. ``functools.partial(sample_noise, prior="mixed", mixed_lambda=0.5)``); ``None``: the scheduler's
            own i.i.d. draws. See the module docstring.
        known: frames whose clean latents are given (context frames): before every step they are set to those
            latents noised to the step's level (with the known frames' own fixed noise), as the model saw them in
            training, and the result holds them exactly.
        context_free, context_guidance: the keyword arguments of a pass without the context frames, and the weight
            ``s`` of Video LDM's context guidance (1: off); batched into the same forward as the text guidance.
        image_only, image_guidance: the keyword arguments of a pass with the image but not the text, and the weight
            of the guidance on the image (``None``: the text's, one guidance on both); see
            :func:`~lvdm.diffusion.guidance.classifier_free_guidance`.
        progress: show a tqdm bar over the steps.
    """
    if guidance is not None and uncond is None:
        raise ValueError("guidance needs uncond (the unconditional keyword arguments).")
    guided = classifier_free_guidance(model_fn, scale_at=guidance or ConstantGuidance(1.0), rescale=guidance_rescale)
    limit = _limiter(threshold)
    check_steps(scheduler, num_inference_steps)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = latents * scheduler.init_noise_sigma
    extra = {"free": context_free, "free_weight": context_guidance} if context_guidance != 1.0 else {}
    extra |= {"image_only": image_only, "image_weight": image_guidance} if image_guidance is not None else {}
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress)):
        if known is not None:
            x = known.at(scheduler, x, t)
        model_input = scheduler.scale_model_input(x, t)
        # () -> (b,)
        t_batch = t.expand(x.shape[0])
        out = guided(model_input, t_batch, cond=cond, uncond=uncond, step_index=i, num_steps=len(timesteps), **extra)
        if limit is not None:
            out = _limit_output(scheduler, out, model_input, t, limit)
        with _drawing_with(scheduler, step_noise):
            x = scheduler.step(out.to(x.dtype), t, x, **step_kwargs, return_dict=False)[0]
    return known.clean(x) if known is not None else x


@dataclass(frozen=True)
class KnownFrames:
    """Frames of the videos being sampled whose clean latents are given (the context of prediction and
    interpolation).

    Attributes:
        latents: ``(b, c, f, h, w)`` clean latents (read only where ``mask`` is set).
        mask: ``(b, f)`` bool, the given frames.
        noise: ``(b, c, f, h, w)`` the given frames' fixed noise.
    """

    latents: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor

    def _where(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # b f -> b 1 f 1 1
        mask = self.mask.to(x.device)[:, None, :, None, None]
        return torch.where(mask, value.to(x.dtype), x)

    def at(self, scheduler: SchedulerMixin, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x`` with the given frames replaced by their latents noised to timestep ``t`` (the scheduler's own
        ``add_noise``, so the scaling of sigma-space samplers is right)."""
        latents = self.latents.to(device=x.device, dtype=torch.float32)
        noisy = scheduler.add_noise(latents, self.noise.to(latents), t.reshape(1).expand(x.shape[0]))
        return self._where(x, noisy)

    def clean(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the given frames set to their clean latents."""
        return self._where(x, self.latents.to(x.device))


@contextmanager
def _drawing_with(scheduler: SchedulerMixin, step_noise: StepNoise | None) -> Iterator[None]:
    """Inside the block, ``scheduler``'s module draws its per-step noise with ``step_noise``. A scheduler whose
    ``step`` takes no generator draws no noise (UniPC: its module has no ``randn_tensor``): nothing to route."""
    if step_noise is None:
        yield
        return
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None and "generator" not in inspect.signature(scheduler.step).parameters:
        yield
        return
    if original is None:
        raise ValueError(
            f"{type(scheduler).__name__} draws its step noise in a way lvdm cannot route through a noise prior; "
            "use a deterministic sampler (ddim, dpmpp, euler, unipc) or the independent prior"
        )

    def draw(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> torch.Tensor:
        return step_noise(tuple(shape), generator=generator, device=device).to(dtype or torch.float32)

    module.randn_tensor = draw
    try:
        yield
    finally:
        module.randn_tensor = original
