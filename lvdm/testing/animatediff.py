"""Tiny AnimateDiff motion modules, built in code: a diffusers ``MotionAdapter`` for the tiny SD1 base, and the
same weights written in the original AnimateDiff checkpoint layout (``mm_sd_v15_v2.ckpt``'s key names).

The original layout is diffusers' converter (``convert_animatediff_checkpoint_to_diffusers``) run backwards: its
renames undone, ``temporal_transformer`` put back after each module's index, and each attention's sinusoidal
``pos_encoder.pe`` table (``(1, max_frames, channels)``) written as AnimateDiff saves it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import MotionAdapter
from safetensors.torch import save_file

from lvdm.testing.models import FLAVOURS, seeded

_ORIGINAL_NAMES = (  # diffusers -> AnimateDiff, the converter's renames reversed
    (".norm1", ".norms.0"),
    (".norm2", ".norms.1"),
    (".norm3", ".ff_norm"),
    (".attn1", ".attention_blocks.0"),
    (".attn2", ".attention_blocks.1"),
)


def tiny_motion_adapter(*, mid_block: bool = True, max_frames: int = 32, seed: int = 0) -> MotionAdapter:
    """A ``MotionAdapter`` for the tiny SD1 UNet (widths 32, 64; 2 layers per block; 8 heads as in every released
    module, which original checkpoints do not record), every weight drawn
    from ``seed`` (``proj_out`` too, so the modules move frames from the start)."""
    widths = FLAVOURS["sd1"].unet["block_out_channels"]
    return seeded(
        lambda: MotionAdapter(
            block_out_channels=widths,
            motion_layers_per_block=2,
            motion_num_attention_heads=8,
            motion_norm_num_groups=32,
            motion_max_seq_length=max_frames,
            use_motion_mid_block=mid_block,
        ),
        seed,
    )


def original_state_dict(adapter: MotionAdapter) -> dict[str, torch.Tensor]:
    """The adapter's weights under AnimateDiff's original key names, frame tables included."""
    out = {}
    for key, value in adapter.state_dict().items():
        if key.endswith("pos_embed.pe"):
            continue
        head, _, rest = key.partition(".motion_modules.")
        index, _, rest = rest.partition(".")
        name = f"{head}.motion_modules.{index}.temporal_transformer.{rest}"
        for new, old in _ORIGINAL_NAMES:
            name = name.replace(new, old)
        out[name] = value.detach().clone()
        if name.endswith(".to_q.weight"):  # one table per attention block, as AnimateDiff's PositionalEncoding has
            table = adapter.config.motion_max_seq_length
            block = name.removesuffix(".to_q.weight")
            out[f"{block}.pos_encoder.pe"] = _sinusoid(value.shape[1], table)
    return out


def write_original_checkpoint(adapter: MotionAdapter, path: str | os.PathLike) -> Path:
    """Write ``adapter`` as an original AnimateDiff checkpoint: ``.safetensors``, or a ``.ckpt`` pickle (``torch.save``
    of the state dict, as AnimateDiff releases them)."""
    path = Path(path)
    tensors = {key: value.contiguous() for key, value in original_state_dict(adapter).items()}
    if path.suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    return path


def _sinusoid(channels: int, length: int) -> torch.Tensor:
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    return SinusoidalPositionalEmbedding(channels, length).pe.clone()
