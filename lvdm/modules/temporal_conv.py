"""The 3D-conv residual block that follows every spatial ResNet block (Video LDM's VideoResBlock).

Written here rather than reusing diffusers' :class:`TemporalResnetBlock` because that block
fixes the kernel at ``(3, 1, 1)`` and initialises its last conv randomly; lvdm needs a
configurable kernel and a branch that starts as the identity (last conv zero), so the
untrained video model is the image model.
"""

from __future__ import annotations

import torch
from torch import nn


class TemporalConvBlock(nn.Module):
    """``x + conv3d(silu(norm(conv3d(silu(norm(x))) + temb)))`` on ``(b, c, f, h, w)``, last conv zeroed.

    Args:
        channels: feature channels ``c`` (unchanged by the block).
        temb_channels: width of the UNet's timestep embedding, or ``None`` for no time input.
        kernel_size: ``(kf, kh, kw)``, each odd; ``(3, 1, 1)`` mixes neighbouring frames only.
        norm_groups: GroupNorm groups (the spatial ResNet's own).
    """

    def __init__(
        self,
        channels: int,
        temb_channels: int | None,
        kernel_size: tuple[int, int, int] = (3, 1, 1),
        norm_groups: int = 32,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.norm1 = nn.GroupNorm(norm_groups, channels, eps=eps)
        self.conv1 = nn.Conv3d(channels, channels, kernel_size, padding=padding)
        self.time_emb_proj = nn.Linear(temb_channels, channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(norm_groups, channels, eps=eps)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size, padding=padding)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``: ``(b, c, f, h, w)``; ``temb``: ``(b, f, temb_channels)`` or ``None``; ``extra``: like ``x``, added
        to the branch's input only (context features), or ``None``; ``embedding``: ``(b, c, f, 1, 1)``, added where
        the timestep embedding is (the FPS embedding), or ``None``."""
        h = _frame_conv(self.conv1, nn.functional.silu(self.norm1(x if extra is None else x + extra)))
        if self.time_emb_proj is not None and temb is not None:
            # b f d -> b c f 1 1
            h = h + self.time_emb_proj(nn.functional.silu(temb)).permute(0, 2, 1)[..., None, None]
        if embedding is not None:
            h = h + embedding
        h = _frame_conv(self.conv2, nn.functional.silu(self.norm2(h)))
        return x + h


def _frame_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; a ``(k, 1, 1)`` kernel runs as the same ``(k, 1)`` conv2d over ``(f, h*w)``.

    Same numbers (to float rounding), but CPU convolution has no fast conv3d kernel for this shape:
    forward + backward of a (3, 1, 1) conv take 1.3-2.3x longer as conv3d (measured at 64-256 channels,
    8 frames). The weights stay a Conv3d's, so module files do not depend on which path ran.
    """
    if conv.kernel_size[1:] != (1, 1):
        return conv(x)
    b, c, f, h, w = x.shape
    weight = conv.weight.squeeze(-1)  # (out, in, k, 1, 1) -> (out, in, k, 1)
    out = nn.functional.conv2d(x.reshape(b, c, f, h * w), weight, conv.bias, padding=(conv.padding[0], 0))
    return out.reshape(b, -1, f, h, w)
