"""Weights files in the formats users bring: original-layout (CompVis/LDM) single-file SD1 checkpoints and LoRAs.

Written from the tiny models of :mod:`lvdm.testing.models`, so loaders can be tested offline against
diffusers' own loading of the very same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import (
    CLIPTextModel,
)  # --- diffusers -> original (CompVis/LDM) key layout -------------------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_PARTS = {  # part: (diffusers blocks, LDM blocks, diffusers resampler, LDM resampler)
    "encoder": ("down_blocks", "down", "downsamplers", "downsample"),
    "decoder": ("up_blocks", "up", "upsamplers", "upsample"),
}


def _add_block(prefixes: dict[str, str], diffusers: str, ldm: str, inner: dict[str, str] | None = None) -> None:
    """Map a block prefix, or each of its named children when ``inner`` renames them."""
    if inner is None:
        prefixes[diffusers] = ldm
    for child, ldm_child in (inner or {}).items():
        prefixes[f"{diffusers}.{child}"] = f"{ldm}.{ldm_child}"


def _unet_prefixes(config: Any) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix for any number of levels (inverse of convert_ldm_unet_checkpoint)."""
    per_level = config.layers_per_block + 1  # LDM counts the down/upsampler as one more input/output block
    prefixes = dict(_UNET_TOP)
    for level in range(len(config.down_block_types)):
        for j in range(config.layers_per_block):
            i = 1 + level * per_level + j
            _add_block(prefixes, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0", _UNET_RESNET)
            _add_block(prefixes, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1")
        downsampler = (level + 1) * per_level  # the input block after this level's resnets
        _add_block(prefixes, f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{downsampler}.0.op")
    _add_block(prefixes, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    _add_block(prefixes, "mid_block.attentions.0", "middle_block.1")
    _add_block(prefixes, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    for level, block_type in enumerate(config.up_block_types):
        for j in range(per_level):
            i = level * per_level + j
            _add_block(prefixes, f"up_blocks.{level}.resnets.{j}", f"output_blocks.{i}.0", _UNET_RESNET)
            _add_block(prefixes, f"up_blocks.{level}.attentions.{j}", f"output_blocks.{i}.1")
        upsampler = 2 if "CrossAttn" in block_type else 1  # after the resnet (and the attention, if any)
        last = (level + 1) * per_level - 1
        _add_block(prefixes, f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{last}.{upsampler}.conv")
    return prefixes


def _vae_prefixes(config: Any) -> dict[str, str]:
    """diffusers -> LDM prefixes for AutoencoderKL (inverse of convert_ldm_vae_checkpoint); LDM numbers up reversed."""
    prefixes = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    levels = len(config.block_out_channels)
    for part, (blocks, ldm_blocks, sampler, ldm_sampler) in _VAE_PARTS.items():
        for level in range(levels):
            ldm_level = level if part == "encoder" else levels - 1 - level
            ldm = f"{part}.{ldm_blocks}.{ldm_level}"
            for j in range(config.layers_per_block + 1):  # the decoder has one extra; encoder extras are unused
                _add_block(prefixes, f"{part}.{blocks}.{level}.resnets.{j}", f"{ldm}.block.{j}", _VAE_RESNET)
            _add_block(prefixes, f"{part}.{blocks}.{level}.{sampler}.0.conv", f"{ldm}.{ldm_sampler}.conv")
        _add_block(prefixes, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        _add_block(prefixes, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
        _add_block(prefixes, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)
    return prefixes


def _rename(key: str, prefixes: dict[str, str]) -> str:
    """Replace the longest mapped module prefix of ``key``; unmapped keys (transformer internals) are kept."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            return ".".join([prefixes[head], *parts[cut:]])
    return key


def _to_ldm(model: nn.Module, prefixes: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    """The model's state dict under LDM names; VAE attention projections become 1x1 convs ``(c, c, 1, 1)``."""
    out = {}
    for key, value in model.state_dict().items():
        ldm_key = prefix + _rename(key, prefixes)
        is_attn_proj = ".mid.attn_1." in ldm_key and value.ndim == 2  # q, k, v, proj_out weights
        out[ldm_key] = (value[:, :, None, None] if is_attn_proj else value).detach().clone().contiguous()
    return out


def _clip_text_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """SD1 stores the HF CLIP text model as is under ``cond_stage_model.transformer.text_model.``."""
    prefix = "cond_stage_model.transformer.text_model."
    state = text_encoder.state_dict()  # flat in transformers >= 5.6, under "text_model." before
    return {prefix + k.removeprefix("text_model."): v.detach().clone().contiguous() for k, v in state.items()}


def write_single_file_checkpoint(components: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write UNet, VAE and CLIP text encoder as one original-layout SD1 ``.safetensors`` (DreamBooth style).

    Keys: ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``.
    Load with ``StableDiffusionPipeline.from_single_file(path, config=str(make_tiny_sd_folder),
    local_files_only=True)``. Only SD1 is supported: SD2 checkpoints keep the text encoder in OpenCLIP layout.
    """
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    if unet.config.use_linear_projection or text_encoder.config.hidden_act != "quick_gelu":
        raise ValueError(
            "write_single_file_checkpoint supports only the SD1 flavour (conv proj_in, OpenAI CLIP text encoder); "
            "SD2 single files store an OpenCLIP text encoder under 'cond_stage_model.model.*', which is not written."
        )
    state = {
        **_to_ldm(unet, _unet_prefixes(unet.config), "model.diffusion_model."),
        **_to_ldm(vae, _vae_prefixes(vae.config), "first_stage_model."),
        **_clip_text_to_ldm(text_encoder),
    }
    save_file(state, str(path), metadata={"format": "pt"})
    return Path(path)


# --- LoRA ------------------------------------------------------------------------------------------------------

_LORA_UP_STD = 0.1  # LoRA delta is ~10% of a unit-scale projection's output (times scale_up)
_LORA_TARGETS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))


def _random_lora(
    unet: UNet2DConditionModel, rank: int, seed: int, scale_up: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (down (rank, in), up (out, rank))}`` for every attention projection, both random."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(_LORA_TARGETS):
            down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=gen) * (_LORA_UP_STD * scale_up / rank**0.5)
            lora[name] = (down, up)
    return lora


def _save_kohya(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    """kohya-ss / A1111 keys; ``alpha = rank`` so the applied scale alpha/rank is 1, as in the peft file."""
    state = {}
    for name, (down, up) in lora.items():
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    save_file(state, str(path), metadata={"format": "pt"})


def _save_peft(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    """diffusers/peft keys (``unet.<module>.lora_A/B.weight``), written by diffusers' own save_lora_weights."""
    state = {}
    for name, (down, up) in lora.items():
        state[f"{name}.lora_A.weight"] = down
        state[f"{name}.lora_B.weight"] = up
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=state, weight_name=path.name)


LORA_FORMATS = {"kohya": _save_kohya, "peft": _save_peft}


def write_lora(
    unet: UNet2DConditionModel,
    path: str | os.PathLike,
    *,
    format: str = "kohya",
    rank: int = 4,
    seed: int = 0,
    scale_up: float = 1.0,
) -> Path:
    """Write a random, non-zero LoRA on the UNet's attention projections (attn1/attn2 to_q, to_k, to_v, to_out.0).

    Both formats load with ``StableDiffusionPipeline.load_lora_weights(path)`` and hold the same weights for the
    same seed, so they change the UNet output identically. ``scale_up`` multiplies the up (B) matrices.
    """
    if format not in LORA_FORMATS:
        raise ValueError(f"Unknown LoRA format {format!r}; known: {sorted(LORA_FORMATS)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    LORA_FORMATS[format](_random_lora(unet, rank, seed, scale_up), path)
    return path
