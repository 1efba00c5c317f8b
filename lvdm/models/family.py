"""Naming the family of a base UNet (the checkpoints a temporal module can move between)."""

from __future__ import annotations

from typing import Any

# cross-attention width -> family, for UNets with SD's block widths
_SD_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_SD_CHANNELS = {(320, 640, 1280, 1280): "sd", (320, 640, 1280): "sdxl"}


_UPSCALER = ((256, 512, 512, 1024), 1024, 7)  # SD x4 upscaler: widths, cross-attention, 4 latent + 3 RGB inputs


def base_family(unet_config: Any) -> str:
    """``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"upscaler"`` (SD's x4 upscaler) or ``"custom-<in>x<cross>-<widths>"`` for
    any other shape.

    Two bases of one family have the same block layout; the layout itself, not this name, is what
    a temporal module is checked against when it loads.
    """
    channels = tuple(unet_config.block_out_channels)
    cross = unet_config.cross_attention_dim
    cross = cross if isinstance(cross, int) else tuple(cross)
    if channels in _SD_CHANNELS and cross in _SD_FAMILIES and unet_config.in_channels == 4:
        return _SD_FAMILIES[cross]
    if (channels, cross, unet_config.in_channels) == _UPSCALER and getattr(unet_config, "num_class_embeds", None):
        return "upscaler"
    widths = "-".join(str(c) for c in channels)
    return f"custom-{unet_config.in_channels}x{cross}-{widths}"


def downsampling(block_out_channels: Any) -> int:
    """A UNet's or VAE's downsampling factor, from its config's ``block_out_channels``: one halving between each two
    of its levels (8 for SD's VAE, 2 for the tiny test VAE)."""
    return 2 ** (len(block_out_channels) - 1)


def family_record(video: Any) -> dict[str, str]:
    """``{"base_family": ...}`` of a video model's UNet, for a checkpoint's metadata; ``{}`` for a model without one
    (the decoder target's)."""
    unet = getattr(video, "unet", None)
    return {"base_family": base_family(unet.config)} if unet is not None else {}
