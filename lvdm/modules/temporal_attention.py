"""Self-attention across frames at every spatial site (Video LDM's temporal transformer).

The block is ``x + proj_out(blocks(proj_in(norm(x)) + pos(frame_positions)))`` with
``proj_out`` zeroed, so it starts as the identity. The per-layer work reuses diffusers'
:class:`TemporalBasicTransformerBlock` (feed-forward in, frame self-attention, feed-forward,
attention through PyTorch SDPA by default); what is written here is the residual frame,
the GroupNorm, the sinusoidal frame-position encoding and the zero-initialised projection.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


class TemporalAttentionBlock(nn.Module):
    """Temporal self-attention on ``(b f) c h w`` feature maps.

    Args:
        channels: feature channels ``c``.
        num_heads: attention heads (``channels`` must divide by it).
        depth: stacked transformer layers.
        norm_groups: GroupNorm groups (the spatial transformer's own).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        depth: int = 1,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"temporal attention: channels {channels} do not divide into {num_heads} heads")
        self.channels = channels
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TemporalBasicTransformerBlock(channels, channels, num_heads, channels // num_heads) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        num_frames: int,
        frame_positions: torch.Tensor,
        extra: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``: ``(b f) c h w``; ``frame_positions``: ``(b, f)``; ``extra``: like ``x``, added to the branch's input
        only (context features), or ``None``; ``embedding``: ``(b f) c``, added with the frame-position encoding (the
        FPS embedding), or ``None``; returns ``(b f) c h w``."""
        bf, c, height, width = x.shape
        h = self.norm(x if extra is None else x + extra)
        # (b f) c h w -> (b f) (h w) c
        h = h.permute(0, 2, 3, 1).reshape(bf, height * width, c)
        h = self.proj_in(h)
        # (b f) -> (b f) 1 c
        pos = get_timestep_embedding(frame_positions.reshape(-1), c, flip_sin_to_cos=True, downscale_freq_shift=0)
        if embedding is not None:
            pos = pos.to(h.dtype) + embedding
        h = h + pos.to(h.dtype)[:, None, :]
        for block in self.blocks:
            # each block regroups (b f) (h w) c -> (b h w) f c, attends over f, and regroups back
            h = block(h, num_frames)
        h = self.proj_out(h)
        # (b f) (h w) c -> (b f) c h w
        h = h.reshape(bf, height, width, c).permute(0, 3, 1, 2)
        return x + h
