"""Tiny, offline, seeded Stable-Diffusion-shaped models for tests, benchmarks and the demo.

Everything here is built in code in well under a second per component: no network, no hub cache. The models have
real SD structure (block types, attention layout, prediction type) at toy width, and every parameter is re-drawn
from ``torch.Generator().manual_seed(seed)`` after construction, so the same seed gives identical weights, different
seeds give different weights, and no layer is zero-initialised (outputs depend on inputs).

Sizes: UNet latents are 8x8 (``sample_size=8``); the tiny VAE has two levels, so it downsamples by **2** (SD's is 8),
i.e. an 8x8 latent decodes to a 16x16 image and ``StableDiffusionPipeline`` defaults to 16x16 px.

Files: :func:`make_tiny_sd` writes a diffusers folder, :func:`write_single_file_checkpoint` an original-layout
(CompVis/LDM) SD1 ``.safetensors`` such as community DreamBooth checkpoints, :func:`write_lora` a kohya or peft LoRA.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from lvdm.errors import closest


@dataclass(frozen=True)
class Flavour:
    """What differs between the tiny SD1 and SD2 stand-ins."""

    unet: Mapping[str, Any]  # UNet2DConditionModel kwargs on top of _UNET_COMMON
    text_act: str  # CLIP text encoder activation: SD1 (OpenAI CLIP) quick_gelu, SD2 (OpenCLIP) gelu
    prediction_type: str  # scheduler target: SD1 epsilon, SD2(-768) v_prediction


_UNET_COMMON = MappingProxyType(
    dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32, cross_attention_dim=32)
)

FLAVOURS: dict[str, Flavour] = {
    # SD1.x: conv proj_in/proj_out, scalar attention_head_dim (= number of heads in diffusers' legacy naming).
    "sd1": Flavour(
        unet=MappingProxyType(
            dict(
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=8,
                use_linear_projection=False,
            )
        ),
        text_act="quick_gelu",
        prediction_type="epsilon",
    ),
    # SD2.1: linear proj_in/proj_out, per-level heads at a constant head width (16 here, 64 in SD2), upcast attention.
    "sd2": Flavour(
        unet=MappingProxyType(
            dict(
                block_out_channels=(32, 64, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 4),
                use_linear_projection=True,
                upcast_attention=True,
            )
        ),
        text_act="gelu",
        prediction_type="v_prediction",
    ),
}

_Model = TypeVar("_Model", bound=nn.Module)
_NORMS = (nn.GroupNorm, nn.LayerNorm)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _flavour(name: str) -> Flavour:
    """Look a flavour up, failing with the known names and a did-you-mean."""
    if name not in FLAVOURS:
        close = closest(name, FLAVOURS)
        hint = f" Did you mean {close!r}?" if close else ""
        raise ValueError(f"Unknown flavour {name!r}; known: {sorted(FLAVOURS)}.{hint}")
    return FLAVOURS[name]


def _random_like(param: torch.Tensor, is_norm_scale: bool, gen: torch.Generator) -> torch.Tensor:
    """Fan-in scaled normal for weights, 1 + noise for norm scales, small noise for biases/vectors."""
    noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
    if is_norm_scale:
        return 1.0 + 0.1 * noise
    if param.ndim >= 2:
        return noise / param[0].numel() ** 0.5  # fan_in = in_features * kernel area
    return 0.1 * noise


def seeded(build: Callable[[], _Model], seed: int) -> _Model:
    """Build a model without touching the global RNG, then re-draw every parameter from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        model = build()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                is_norm_scale = isinstance(module, _NORMS) and name == "weight"
                param.copy_(_random_like(param, is_norm_scale, gen))
    return model.eval()


def tiny_unet(flavour: str = "sd1", seed: int = 0) -> UNet2DConditionModel:
    """An SD1- or SD2-shaped UNet (8x8 latents, 32-dim text context), randomly initialised from ``seed``."""
    kwargs = {**_UNET_COMMON, **_flavour(flavour).unet}
    return seeded(lambda: UNet2DConditionModel(**kwargs), seed)


def tiny_upscaler_unet(seed: int = 0) -> UNet2DConditionModel:
    """An SD x4-upscaler-shaped UNet: 7 input channels (4 noisy latents + 3 low-res RGB), noise level as class label.

    Like ``stabilityai/stable-diffusion-x4-upscaler``: ``num_class_embeds=1000`` (``class_labels`` is the integer
    noise level), linear projections, cross-attention-only transformers, first level without attention.
    """
    kwargs = dict(
        sample_size=8,
        in_channels=7,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=1000,
        class_embed_type=None,
    )
    return seeded(lambda: UNet2DConditionModel(**kwargs), seed)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A two-level AutoencoderKL (downscale factor 2, 4 latent channels, SD1 scaling factor 0.18215)."""
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=16,
        scaling_factor=0.18215,
    )
    return seeded(lambda: AutoencoderKL(**kwargs), seed)


def _byte_vocab() -> dict[str, int]:
    """CLIP's layout without merges: 256 byte symbols, the same with ``</w>``, then BOS and EOS."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + [_BOS, _EOS]
    return {token: i for i, token in enumerate(tokens)}


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer (514 tokens, no merges, ``model_max_length=77``), written to files and loaded."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(_byte_vocab()), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        config = dict(model_max_length=77, bos_token=_BOS, eos_token=_EOS, unk_token=_EOS, pad_token=_EOS)
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def tiny_text_encoder(flavour: str = "sd1", seed: int = 0) -> CLIPTextModel:
    """A 2-layer, 32-wide CLIP text encoder matching :func:`tiny_tokenizer`'s vocabulary."""
    vocab = _byte_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=_flavour(flavour).text_act,
        projection_dim=32,
        bos_token_id=vocab[_BOS],
        eos_token_id=vocab[_EOS],
        pad_token_id=vocab[_EOS],
    )
    return seeded(lambda: CLIPTextModel(config), seed)


def tiny_clip_vision(seed: int = 0) -> CLIPVisionModelWithProjection:
    """A 2-layer CLIP image encoder for 32x32 images (patch 8, width 32, 32-dim projection)."""
    config = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    return seeded(lambda: CLIPVisionModelWithProjection(config), seed)


def tiny_scheduler(flavour: str = "sd1") -> DDIMScheduler:
    """SD's DDIM schedule (scaled_linear 0.00085..0.012 over 1000 steps) with the flavour's prediction type."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=_flavour(flavour).prediction_type,
    )


def tiny_sd_components(flavour: str = "sd1", seed: int = 0) -> dict[str, Any]:
    """All five ``StableDiffusionPipeline`` components (unet, vae, text_encoder, tokenizer, scheduler)."""
    return {
        "unet": tiny_unet(flavour, seed),
        "vae": tiny_vae(seed),
        "text_encoder": tiny_text_encoder(flavour, seed),
        "tokenizer": tiny_tokenizer(),
        "scheduler": tiny_scheduler(flavour),
    }


def make_tiny_sd(path: str | os.PathLike, flavour: str = "sd1", seed: int = 0) -> Path:
    """Write a complete diffusers folder (safetensors weights, no safety checker) and return its path.

    Loads back with ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None)`` and each model with
    ``from_pretrained(path, subfolder=...)``; also serves as ``config=str(path)`` for ``from_single_file``.
    """
    pipe = StableDiffusionPipeline(
        **tiny_sd_components(flavour, seed),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
