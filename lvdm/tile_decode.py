"""The VAE's decoder in tiles, its middle on the whole frame.

A VAE decoder's middle block runs at the latent size and holds a self-attention over every latent pixel of the
frame: cut into tiles, each tile attends to its own pixels only, and no choice of GroupNorm statistics mends that.
The middle is also the decoder's cheapest part (the latent size; the up blocks after it run at 2, 4 and 8 times
that in each direction and hold the memory), so :func:`decode_latents_tiled` runs ``conv_in`` and the middle block
on the whole frame and only the up blocks and the output layers in tiles, cut from the middle's output,
cross-faded (:func:`lvdm.tiles.tiled`), their GroupNorms normalised by the frame's statistics as the pipeline says.

Measured on an x4 upscaler trained here on 128 px patches (the demo's VAE and text encoder, 64x64 latents of
256 px frames, tiles of 32 latents sharing 8; mean |difference| per 255 from the whole decode of the same
latents): the whole decoder in tiles 3.02 with the subsampled reference's statistics, 4.11 pooled, 10.85 with each
tile's own, 2.89 with the whole frame's own (an oracle); the middle whole 0.52, 0.29 pooled, 8.52 with each tile's
own, 0.06 with the whole frame's. The peak memory of one SD x4 frame's decode is in ``benchmarks/upscale.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lvdm.models.family import downsampling


def splits_its_decoder(vae: Any) -> bool:
    """Whether ``vae``'s decoder is diffusers' ``Decoder`` with GroupNorm output (the middle can run apart from the
    up blocks; a temporal decoder or a spatially normalised one cannot)."""
    from diffusers.models.autoencoders.vae import Decoder

    decoder = getattr(vae, "decoder", None)
    return isinstance(decoder, Decoder) and isinstance(getattr(decoder, "conv_norm_out", None), nn.GroupNorm)


@torch.no_grad()
def decode_latents_tiled(
    vae: Any, latents: torch.Tensor, tile: int, overlap: int, *, frame_norms: bool | str = True, passes: int = 1
) -> torch.Tensor:
    """Scaled latents ``(b, c, f, h, w)`` -> video ``(b, f, 3, H, W)`` in [-1, 1], a frame at a time: the
    decoder's middle on the whole frame, the rest over ``tile`` x ``tile`` latent windows sharing ``overlap``,
    normalised by the frame's GroupNorm statistics (``frame_norms``: ``True`` a subsampled reference run,
    ``"pooled"`` the tiles' own summed, gathered in ``passes`` passes, ``False`` each tile's own;
    :mod:`lvdm.tile_norms`)."""
    from lvdm.models.encoders import decode_latents
    from lvdm.tiles import tiled

    decoder = vae.decoder
    scale = downsampling(vae.config.block_out_channels)
    tail = nn.ModuleList([decoder.up_blocks, decoder.conv_norm_out])
    up_dtype = next(decoder.up_blocks.parameters()).dtype  # diffusers' Decoder (<= 0.35) casts the middle's output

    def up(hidden: torch.Tensor) -> torch.Tensor:  # 1 C 1 h w -> 1 3 1 H W
        sample = hidden[:, :, 0]
        for block in decoder.up_blocks:
            sample = block(sample, None)
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(sample)))[:, :, None]

    def decode_frame(z: torch.Tensor) -> torch.Tensor:  # 1 c h w (the VAE's own latents) -> 1 3 H W
        if getattr(vae, "post_quant_conv", None) is not None:
            z = vae.post_quant_conv(z)
        middle = decoder.mid_block(decoder.conv_in(z), None).to(up_dtype)  # the whole frame
        # one per frame: a pooled function keeps its statistics from call to call, and these are this frame's
        run = tiled(up, (1, tile, tile), (0, overlap, overlap), scale=scale, norms=tail if frame_norms else None,
                    pooled=frame_norms == "pooled", passes=passes)  # fmt: skip
        return run(middle[:, :, None])[:, :, 0]

    return decode_latents(vae, latents, chunk_frames=1, decode=decode_frame)
