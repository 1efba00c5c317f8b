"""Diffusion math around a network passed in as ``model_fn(x_t, t, **cond)``: noise priors, the training loss,
classifier-free guidance and sampling loops on diffusers' schedulers. Nothing here imports a model class.

Latents are ``(b, c, f, h, w)``; ``t``/``timesteps`` is diffusion time, ``f`` is frames.
"""

from lvdm.diffusion.guidance import (
    GUIDANCE_SCHEDULES,
    classifier_free_guidance,
    guidance_schedule,
    threshold_x0,
)
from lvdm.diffusion.loss import LossTerms, diffusion_loss, min_snr_weights, prediction_target, snr
from lvdm.diffusion.noise import NOISE_PRIORS, sample_noise, step_noise_for
from lvdm.diffusion.sampling import SAMPLERS, KnownFrames, make_scheduler, predicted_x0, sample

__all__ = [
    "GUIDANCE_SCHEDULES",
    "NOISE_PRIORS",
    "SAMPLERS",
    "KnownFrames",
    "LossTerms",
    "classifier_free_guidance",
    "diffusion_loss",
    "guidance_schedule",
    "make_scheduler",
    "min_snr_weights",
    "predicted_x0",
    "prediction_target",
    "sample",
    "sample_noise",
    "snr",
    "step_noise_for",
    "threshold_x0",
]
