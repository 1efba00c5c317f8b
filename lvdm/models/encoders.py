"""The frozen encoders around the video UNet: the VAE (in frame chunks) and the CLIP text encoder.

Latents are handled as the VAE's Gaussian parameters (``mean``, ``logvar`` stacked on the
channel axis, as diffusers' ``DiagonalGaussianDistribution`` holds them) until the moment a
latent is drawn with :func:`sample_latents`. The latent cache stores these parameters, so a
cached training batch and an on-the-fly one drawn with the same generator are identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, *, chunk_frames: int = 16) -> torch.Tensor:
    """``(b, f, 3, h, w)`` in [-1, 1] -> latent Gaussian parameters ``(b, 2c, f, h/8, w/8)``.

    Frames go through the VAE ``chunk_frames`` at a time to bound memory.
    """
    b, f = video.shape[:2]
    # b f c h w -> (b f) c h w
    frames = video.reshape(b * f, *video.shape[2:]).to(device=vae.device, dtype=vae.dtype).contiguous()
    params = torch.cat([vae.encode(chunk).latent_dist.parameters for chunk in frames.split(chunk_frames)])
    # (b f) 2c h w -> b 2c f h w
    return params.reshape(b, f, *params.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()


def sample_latents(vae, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw scaled latents ``(b, c, f, h, w)`` from Gaussian parameters ``(b, 2c, f, h, w)``."""
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    latents = mean + std * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, chunk_frames: int = 8) -> torch.Tensor:
    """Scaled latents ``(b, c, f, h, w)`` -> video ``(b, f, 3, H, W)`` in [-1, 1], ``chunk_frames`` at a time."""
    b, c, f = latents.shape[:3]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # b c f h w -> (b f) c h w
    frames = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, *latents.shape[3:])
    frames = frames.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
    video = torch.cat([vae.decode(chunk).sample for chunk in frames.split(chunk_frames)])
    # (b f) 3 H W -> b f 3 H W
    return video.reshape(b, f, *video.shape[1:]).clamp(-1, 1)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, captions: Sequence[str]) -> torch.Tensor:
    """Captions -> text embeddings ``(b, n, d)``; longer captions are truncated at the tokenizer's limit."""
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]
