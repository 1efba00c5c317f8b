"""A tiny SD x4 upscaler, built in code: the shapes of ``stabilityai/stable-diffusion-x4-upscaler`` at toy width.

Its parts are the real one's kinds: a UNet taking 4 noisy latents + 3 low-res RGB channels with the low-res noise
level as class label (:func:`~lvdm.testing.models.tiny_upscaler_unet`), a VAE that downsamples by **4** (three
levels, scaling factor 0.08333, so a latent is as large as the low-res image and decodes to 4x its size), the
tiny CLIP text encoder, a v-prediction DDIM schedule and a DDPM low-res noise schedule, ``max_noise_level`` 350.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

from lvdm.testing.models import seeded, tiny_text_encoder, tiny_tokenizer, tiny_upscaler_unet

MAX_NOISE_LEVEL = 350


def tiny_upscaler_vae(seed: int = 0) -> AutoencoderKL:
    """A three-level AutoencoderKL (downscale factor 4, 4 latent channels, the x4 upscaler's scaling 0.08333)."""
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.08333,
    )
    return seeded(lambda: AutoencoderKL(**kwargs), seed)


def upscaler_schedulers() -> tuple[DDIMScheduler, DDPMScheduler]:
    """The x4 upscaler's sampling schedule (v-prediction DDIM) and its low-res noise schedule (DDPM), as its
    ``scheduler`` and ``low_res_scheduler`` folders configure them."""
    betas = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    sampler = DDIMScheduler(
        **betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"
    )
    return sampler, DDPMScheduler(**betas, clip_sample=False)


def tiny_upscaler_components(seed: int = 0) -> dict[str, Any]:
    """The ``StableDiffusionUpscalePipeline`` components."""
    scheduler, low_res = upscaler_schedulers()
    return {
        "unet": tiny_upscaler_unet(seed),
        "vae": tiny_upscaler_vae(seed),
        "text_encoder": tiny_text_encoder("sd2", seed),
        "tokenizer": tiny_tokenizer(),
        "scheduler": scheduler,
        "low_res_scheduler": low_res,
    }


def make_tiny_upscaler(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a diffusers ``StableDiffusionUpscalePipeline`` folder (safetensors) and return its path."""
    pipe = StableDiffusionUpscalePipeline(**tiny_upscaler_components(seed), max_noise_level=MAX_NOISE_LEVEL)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
