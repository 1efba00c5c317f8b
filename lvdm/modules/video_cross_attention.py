"""Spatial cross-attention that projects the text (and image tokens) once per video, not once per frame.

Inside :meth:`VideoUNet.forward <lvdm.models.VideoUNet.forward>` the 2D UNet sees ``(b f)`` frames, and its
cross-attentions get the per-video encoder states repeated for every frame. diffusers' processor projects
those ``b f`` copies to keys and values: ``f`` times the work, and for patches or small frames (the upscaler's
training) a large share of the step. Cross-attention treats every query token independently, so all ``f``
frames of a video can instead be one query sequence of ``f h w`` tokens against one projection of the
video's text: the same result (up to float summation order), with the key/value projections done ``b``
times instead of ``b f``.

The shortcut is taken only where it is exact: inside a frame context, with no attention mask and none of the
optional norms and residuals SD's cross-attentions do not have; everywhere else diffusers' own code runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn
from torch.nn import functional as F

from lvdm.modules.frame_context import active_frames


def frames_sharing_context(
    attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor, attention_mask: torch.Tensor | None
) -> int | None:
    """``f`` when the ``(b f)`` frames of ``hidden_states`` read a ``context`` repeated over each video's frames
    (``VideoUNet.forward``'s), and the layer has nothing that would make sharing inexact; otherwise ``None``."""
    frames = active_frames()
    if frames is None or frames.num_frames == 1 or attention_mask is not None or hidden_states.ndim != 3:
        return None
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross or attn.residual_connection:
        return None
    if attn.norm_q is not None or attn.norm_k is not None:
        return None
    per_frame = frames.batch_size * frames.num_frames
    if hidden_states.shape[0] != per_frame or context.shape[0] != per_frame:
        return None
    return frames.num_frames


def attend_once_per_video(
    attn: Attention, query: torch.Tensor, context: torch.Tensor, frames: int, to_k: nn.Module, to_v: nn.Module
) -> torch.Tensor:
    """Attention of ``query`` ``((b f), n, inner)`` (projected) over ``context`` ``((b f), m, d)`` (repeated over
    each video's ``frames``), projected by ``to_k``/``to_v`` once per video; ``((b f), n, inner)``."""
    per_video = context[::frames]
    key, value = to_k(per_video), to_v(per_video)
    b, heads = per_video.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    # (b f) n (h d) -> b h (f n) d: one query sequence per video
    q = query.reshape(b, -1, heads, head_dim).transpose(1, 2)
    k = key.view(b, -1, heads, head_dim).transpose(1, 2)
    v = value.view(b, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    # b h (f n) d -> (b f) n (h d)
    return out.transpose(1, 2).reshape(query.shape).to(query.dtype)


def project_out(attn: Attention, hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's output projection, dropout and rescaling (what diffusers' processors end with)."""
    return attn.to_out[1](attn.to_out[0](hidden_states)) / attn.rescale_output_factor


class VideoCrossAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, with the text projected once per video inside a video UNet (module notes)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        frames = None
        if isinstance(encoder_hidden_states, torch.Tensor) and not args and kwargs.get("scale") is None:
            frames = frames_sharing_context(attn, hidden_states, encoder_hidden_states, attention_mask)
        if frames is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        query = attn.to_q(hidden_states)
        out = attend_once_per_video(attn, query, encoder_hidden_states, frames, attn.to_k, attn.to_v)
        return project_out(attn, out)


def cross_attentions(unet: nn.Module) -> Iterator[tuple[str, Attention]]:
    """The spatial cross-attention layers of ``unet`` (``...transformer_blocks.0.attn2``), in diffusers' processor
    order (down, up, mid blocks), the order IP-Adapter files number them in; temporal layers are skipped."""
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2") and ".temporal." not in name:
            if module.is_cross_attention:
                yield name, module


def share_text_projections(unet: nn.Module) -> int:
    """Give each spatial cross-attention of ``unet`` still on diffusers' SDPA processor the
    :class:`VideoCrossAttnProcessor`; returns how many. Custom processors (a part's, xformers) are kept."""
    shared = 0
    for _, attn in cross_attentions(unet):
        if type(attn.processor) is AttnProcessor2_0:
            attn.set_processor(VideoCrossAttnProcessor())
            shared += 1
    return shared
