"""The frozen encoders around the video UNet: the VAE (in frame chunks), the CLIP text encoder and, for image
conditioning, a CLIP vision encoder.

Latents are handled as the VAE's Gaussian parameters (``mean``, ``logvar`` stacked on the
channel axis, as diffusers' ``DiagonalGaussianDistribution`` holds them) until the moment a
latent is drawn with :func:`sample_latents`. The latent cache stores these parameters, so a
cached training batch and an on-the-fly one drawn with the same generator are identical.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
def decode_latents(
    vae, latents: torch.Tensor, *, chunk_frames: int = 8, decode: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Scaled latents ``(b, c, f, h, w)`` -> video ``(b, f, 3, H, W)`` in [-1, 1], ``chunk_frames`` at a time;
    ``decode``: what turns a chunk of the VAE's own latents ``(n, c, h, w)`` into frames (default its decoder
    whole; :mod:`lvdm.tile_decode` gives its tiled one)."""
    b, c, f = latents.shape[:3]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # b c f h w -> (b f) c h w
    frames = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, *latents.shape[3:])
    frames = frames.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
    decode = decode or (lambda chunk: vae.decode(chunk).sample)
    video = torch.cat([decode(chunk) for chunk in frames.split(chunk_frames)])
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


# ------------------------------------------------------------------------------------------------ images
@dataclass
class ImageEncoder:
    """A frozen CLIP vision encoder and the preprocessing it was trained with (resize, centre crop, normalise)."""

    model: Any  # transformers.CLIPVisionModelWithProjection
    processor: Any  # transformers.CLIPImageProcessor
    path: str | None = None

    @property
    def width(self) -> int:
        """The width of its tokens (``hidden_size``)."""
        return int(self.model.config.hidden_size)


def image_encoder_width(path: str | os.PathLike) -> int:
    """The token width (``hidden_size``) of the CLIP vision encoder folder ``path``, from its ``config.json``."""
    from lvdm.errors import CheckpointError
    from lvdm.fileio import read_json

    config = Path(path) / "config.json"
    try:
        data = read_json(config)
        data = data.get("vision_config", data) if "hidden_size" not in data else data
        return int(data["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"image encoder {path}: cannot read its width from {config} ({exc})") from None


def load_image_encoder(path: str | os.PathLike, *, device: Any = None, dtype: Any = None) -> ImageEncoder:
    """A CLIP vision encoder folder as transformers saves it (``config.json`` and weights, e.g. the
    ``image_encoder`` folder IP-Adapter ships, CLIP ViT-H/14 for SD 1.5 Plus); its ``preprocessor_config.json``
    when present, else CLIP's standard preprocessing at the encoder's image size. Frozen, in eval mode."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from lvdm.errors import CheckpointError

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"image encoder {path}: expected a transformers CLIP vision folder with config.json")
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"image encoder {path} does not load: {str(exc).splitlines()[0]}") from None
    size = model.config.image_size
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(folder)
    else:
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    return ImageEncoder(model, processor, str(folder.absolute()))


def image_pixels(encoder: ImageEncoder, images: Sequence[Any]) -> torch.Tensor:
    """RGB uint8 arrays ``(h, w, 3)`` or PIL images -> the encoder's normalised pixels ``(b, 3, s, s)``."""
    return encoder.processor(images=list(images), return_tensors="pt").pixel_values


def no_image_pixels(encoder: ImageEncoder, n: int = 1) -> torch.Tensor:
    """``n`` all-zero normalised inputs ``(n, 3, s, s)``: "no image", as IP-Adapter drops an image in training and
    diffusers' pipelines make the negative image."""
    size = encoder.model.config.image_size
    return torch.zeros(n, 3, size, size)


@torch.no_grad()
def encode_image(encoder: ImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised pixels ``(b, 3, s, s)`` -> the penultimate layer's tokens ``(b, 1 + patches, width)`` (what
    IP-Adapter Plus reads). All-zero pixels are the "no image" input (IP-Adapter's dropped image)."""
    param = next(encoder.model.parameters())
    out = encoder.model(pixels.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
    return out.hidden_states[-2]


def frame_tokens(encoder: ImageEncoder, frames: torch.Tensor) -> torch.Tensor:
    """Video frames ``(k, 3, h, w)`` in [-1, 1] -> their CLIP tokens ``(k, 1 + patches, width)`` float32, each frame
    read as the uint8 picture it is (what training conditions on, on the fly or from the latent cache)."""
    from lvdm.media import to_uint8_frames

    return encode_image(encoder, image_pixels(encoder, list(to_uint8_frames(frames.float())))).float()


def no_image_tokens(encoder: ImageEncoder) -> torch.Tensor:
    """The tokens ``(1, n, width)`` of "no image" (:func:`no_image_pixels`), float32."""
    return encode_image(encoder, no_image_pixels(encoder)).float()
