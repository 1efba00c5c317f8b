"""The denoising training loss, with the network passed in as ``model_fn``.

diffusers provides the forward process (``scheduler.add_noise``) and the v-target (``scheduler.get_velocity``);
this module uses both. What it writes by hand, because diffusers keeps it inline in its example training scripts:
the target for each prediction type, the SNR, min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion
Training via Min-SNR Weighting Strategy") for all three prediction types, and the per-sample loss.
(``diffusers.training_utils.compute_snr`` exists but imports the pipelines; ``snr`` here is one line.)

The scheduler must be a training scheduler whose ``add_noise`` indexes ``alphas_cumprod`` by training timestep:
``DDPMScheduler`` or ``DDIMScheduler`` (not the sigma-based Euler/DPM schedulers, whose ``add_noise`` follows
their inference schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin

from lvdm.diffusion._common import ModelFn, lookup
from lvdm.diffusion.noise import sample_noise


@dataclass
class LossTerms:
    """What :func:`diffusion_loss` computed, for the optimiser and for logging.

    Attributes:
        loss: ``(b,)`` per-sample weighted MSE, float32; call ``.mean()`` for the batch loss.
        timesteps: ``(b,)`` long, the diffusion timesteps used.
        target: ``(b, c, f, h, w)`` float32, what the model should have predicted.
        prediction: ``(b, c, f, h, w)`` float32, what it predicted (still attached to the graph).
        weights: ``(b,)`` float32 loss weights (ones without ``snr_gamma``).
    """

    loss: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    prediction: torch.Tensor
    weights: torch.Tensor


_TARGETS: dict[str, Callable[[SchedulerMixin, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "epsilon": lambda scheduler, latents, noise, timesteps: noise,
    "v_prediction": lambda scheduler, latents, noise, timesteps: scheduler.get_velocity(latents, noise, timesteps),
    "sample": lambda scheduler, latents, noise, timesteps: latents,
}

# min(snr, gamma) divided by the weight the plain MSE already puts on the x0 error for each target
# (snr for epsilon, snr + 1 for v, 1 for x0); g / snr is inf at snr == 0 and clamps to 1, never nan.
_MIN_SNR_WEIGHTS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "epsilon": lambda snr_t, gamma: (gamma / snr_t).clamp(max=1.0),
    "v_prediction": lambda snr_t, gamma: snr_t.clamp(max=gamma) / (snr_t + 1.0),
    "sample": lambda snr_t, gamma: snr_t.clamp(max=gamma),
}


def prediction_target(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target for ``scheduler.config.prediction_type``.

    ``"epsilon"`` -> ``noise``; ``"v_prediction"`` -> ``scheduler.get_velocity(latents, noise, timesteps)``;
    ``"sample"`` -> ``latents``. Any other prediction type raises ``ValueError``.
    """
    target = lookup(_TARGETS, scheduler.config.prediction_type, "prediction_type")
    return target(scheduler, latents, noise, timesteps)


def snr(scheduler: SchedulerMixin, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` at ``timesteps``, float32, on their device."""
    alpha_bar = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(scheduler: SchedulerMixin, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights ``(b,)`` for the scheduler's prediction type (Hang et al. 2023).

    epsilon: ``min(snr, g) / snr``; v_prediction: ``min(snr, g) / (snr + 1)``; sample: ``min(snr, g)``.
    """
    weight = lookup(_MIN_SNR_WEIGHTS, scheduler.config.prediction_type, "prediction_type")
    return weight(snr(scheduler, timesteps), gamma)


def sample_timesteps(
    scheduler: SchedulerMixin,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(batch_size,)`` long timesteps, uniform in ``[0, num_train_timesteps)``, drawn from ``generator``."""
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=draw_device)
    return t.to(device)


def diffusion_loss(
    model_fn: ModelFn,
    latents: torch.Tensor,
    scheduler: SchedulerMixin,
    *,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
    **cond: object,
) -> LossTerms:
    """One denoising loss evaluation: noise the latents, call the model, compare with the target.

    Args:
        model_fn: ``model_fn(x_t, t, **cond) -> (b, c, f, h, w)``, ``x_t`` in ``latents.dtype``, ``t`` ``(b,)`` long.
        latents: clean latents ``x0``, ``(b, c, f, h, w)`` (any shape with the batch first works).
        scheduler: a ``DDPMScheduler``/``DDIMScheduler``; its config gives ``num_train_timesteps`` and
            ``prediction_type``.
        noise: ``eps`` like ``latents``; ``None`` draws independent noise from ``generator`` (pass
            :func:`~lvdm.diffusion.noise.sample_noise` output for the mixed prior or offset noise).
        timesteps: ``(b,)`` long; ``None`` draws them uniformly from ``generator``, first (before the noise drawn
            here, so a generator in a given state gives the same timesteps whether or not ``noise`` is given).
        generator: the source of the timesteps and noise drawn here.
        snr_gamma: if set, weight each sample by min-SNR-gamma (5.0 in the paper); else weight 1.
        **cond: passed to ``model_fn`` untouched (``encoder_hidden_states``, ``image_only_indicator``, ...).

    Returns:
        :class:`LossTerms`; everything but the model call is computed in float32.
    """
    x0 = latents.float()
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, x0.shape[0], generator=generator, device=x0.device)
    timesteps = timesteps.to(x0.device).long()
    if noise is None:
        noise = sample_noise(tuple(x0.shape), generator=generator, device=x0.device)
    noise = noise.to(device=x0.device, dtype=torch.float32)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    target = prediction_target(scheduler, x0, noise, timesteps)
    prediction = model_fn(x_t.to(latents.dtype), timesteps, **cond).float()
    if prediction.shape != target.shape:
        raise ValueError(f"model_fn returned shape {tuple(prediction.shape)}, expected {tuple(target.shape)}.")
    if snr_gamma is None:
        weights = torch.ones_like(timesteps, dtype=torch.float32)
    else:
        weights = min_snr_weights(scheduler, timesteps, snr_gamma)
    # mean over every dim but the batch: (b, c, f, h, w) -> (b,)
    loss = (prediction - target).square().mean(dim=tuple(range(1, target.ndim))) * weights
    return LossTerms(loss=loss, timesteps=timesteps, target=target, prediction=prediction, weights=weights)
