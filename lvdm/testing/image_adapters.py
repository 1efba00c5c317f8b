"""Tiny stand-ins for image conditioning: a CLIP vision encoder folder and an IP-Adapter Plus checkpoint.

The IP-Adapter file uses the layout IP-Adapter's own releases and diffusers' ``load_ip_adapter`` read
(``image_proj.*`` in the original resampler names, ``ip_adapter.<2k+1>.to_k_ip.weight`` per cross-attention), so
the tests can load the same file in lvdm and in diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from safetensors.torch import save_file
from transformers import CLIPImageProcessor

from lvdm.testing.models import seeded, tiny_clip_vision


def write_image_encoder(path: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny CLIP vision encoder (32x32 images) saved as a transformers folder with its preprocessor config."""
    path = Path(path)
    model = tiny_clip_vision(seed)
    model.save_pretrained(path)
    size = model.config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)
    return path


def _to_original(name: str) -> str:
    """A diffusers ``IPAdapterPlusImageProjection`` key in IP-Adapter's own resampler names (what the converter in
    diffusers' ``UNet2DConditionLoadersMixin`` reads back)."""
    parts = name.split(".")
    if parts[0] != "layers":
        return name
    i, rest = parts[1], ".".join(parts[2:])
    renames = {
        "ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out", "ff.0": "1.0",
        "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3",
    }  # fmt: skip
    for new, old in renames.items():
        if rest.startswith(new + "."):
            return f"layers.{i}.{old}{rest[len(new) :]}"
    raise KeyError(name)


def write_ip_adapter_plus(
    path: str | os.PathLike,
    *,
    cross_attention_dim: int,
    layer_widths: list[int],
    embed_dims: int = 32,
    num_queries: int = 4,
    seed: int = 0,
    std: float = 0.05,
) -> Path:
    """A random IP-Adapter Plus checkpoint (``.safetensors``) for a UNet whose cross-attentions have
    ``layer_widths`` (in diffusers' processor order), reading ``embed_dims``-wide CLIP tokens."""
    projection = seeded(
        lambda: IPAdapterPlusImageProjection(
            embed_dims=embed_dims, output_dims=cross_attention_dim, hidden_dims=64, depth=4, dim_head=64, heads=1,
            num_queries=num_queries,
        ),
        seed,
    )  # fmt: skip
    state = {}
    diffusers_state = projection.state_dict()
    for name, value in diffusers_state.items():
        if ".attn.to_k." in name or ".attn.to_v." in name:
            continue
        state[f"image_proj.{_to_original(name)}"] = value
    for i in range(4):
        k, v = diffusers_state[f"layers.{i}.attn.to_k.weight"], diffusers_state[f"layers.{i}.attn.to_v.weight"]
        state[f"image_proj.layers.{i}.0.to_kv.weight"] = torch.cat([k, v])
    g = torch.Generator().manual_seed(seed + 1)
    for n, width in enumerate(layer_widths):
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * n + 1}.{kind}.weight"] = torch.randn(width, cross_attention_dim, generator=g) * std
    path = Path(path)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path
