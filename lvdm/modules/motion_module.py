"""AnimateDiff's motion module: self-attention across frames at one UNet site, added residually.

The weights and the block math are diffusers' :class:`AnimateDiffTransformer3D`, what ``UNetMotionModel`` and
``MotionAdapter`` hold, so a module moves between lvdm and the AnimateDiff tools by renaming keys only
(:mod:`lvdm.models.animatediff`). What lvdm adds to it:

- the branch's input may carry the context encoder's features (``extra``), as the other temporal layers' does;
- the frame-position table is read at each frame's own position (``frame_positions``, whole numbers below
  ``max_frames``) rather than at ``0 .. f-1`` only, and the FPS embedding is added beside it;
- ``proj_out`` starts at zero, as in AnimateDiff's own training (diffusers leaves it random), so a new module is
  the identity and an untrained model is the image model.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn


class _FramePositions(SinusoidalPositionalEmbedding):
    """diffusers' sinusoidal table (the same ``pe`` buffer), adding the encoding the motion module prepared for this
    call (``b 1 f c``: each frame's row, plus the FPS embedding, broadcast over the pixels rather than copied to
    each) instead of the table's first ``f`` rows."""

    def __init__(self, embed_dim: int, max_seq_length: int) -> None:
        super().__init__(embed_dim, max_seq_length)
        self.encoding: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoding is None:
            raise RuntimeError("a motion module's transformer block ran outside MotionModule.forward")
        b, _, f, c = self.encoding.shape
        # (b h w) f c -> b (h w) f c, plus b 1 f c
        return (x.reshape(b, -1, f, c) + self.encoding).reshape(x.shape)


class MotionModule(AnimateDiffTransformer3D):
    """An AnimateDiff motion module on ``(b f) c h w`` feature maps.

    Args:
        channels: feature channels ``c`` (``channels`` must divide by ``num_heads``).
        num_heads: attention heads (8 in every released AnimateDiff module).
        depth: transformer layers.
        norm_groups: GroupNorm groups.
        max_frames: length of the frame-position table.
    """

    def __init__(self, channels: int, num_heads: int, depth: int = 1, norm_groups: int = 32, max_frames: int = 32):
        if channels % num_heads:
            raise ValueError(f"motion module: channels {channels} do not divide into {num_heads} heads")
        super().__init__(
            num_attention_heads=num_heads,
            attention_head_dim=channels // num_heads,
            in_channels=channels,
            num_layers=depth,
            norm_num_groups=norm_groups,
            cross_attention_dim=None,
            activation_fn="geglu",
            attention_bias=False,
            double_self_attention=True,
            positional_embeddings="sinusoidal",
            num_positional_embeddings=max_frames,
        )
        for block in self.transformer_blocks:
            block.pos_embed = _FramePositions(channels, max_frames)
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
        """``x``: ``(b f) c h w``; ``frame_positions``: ``(b, f)`` whole numbers below the table's length (checked
        once per call by the VideoUNet); ``extra``: like ``x``, added to the branch's input only, or ``None``;
        ``embedding``: ``(b f) c``, added with the frame encoding, or ``None``; returns ``(b f) c h w``."""
        bf, c, height, width = x.shape
        b = bf // num_frames
        h = x if extra is None else x + extra
        # (b f) c h w -> b c f h w: the GroupNorm's statistics span the whole clip, as AnimateDiff's do
        h = self.norm(h.reshape(b, num_frames, c, height, width).permute(0, 2, 1, 3, 4))
        # b c f h w -> (b h w) f c
        h = self.proj_in(h.permute(0, 3, 4, 2, 1).reshape(b * height * width, num_frames, c))
        encoding = self._encoding(frame_positions, embedding, b, num_frames).to(h.dtype)
        for block in self.transformer_blocks:
            block.pos_embed.encoding = encoding
            try:
                h = block(h)
            finally:
                block.pos_embed.encoding = None
        h = self.proj_out(h)
        # (b h w) f c -> (b f) c h w
        h = h.reshape(b, height, width, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, height, width)
        return x + h

    def _encoding(self, positions: torch.Tensor, embedding: torch.Tensor | None, b: int, f: int) -> torch.Tensor:
        """The table's row at each frame's position (plus the FPS embedding): ``(b, f)`` -> ``b 1 f c``."""
        rows = self.transformer_blocks[0].pos_embed.pe[0][positions.long()]  # b f c
        if embedding is not None:
            rows = rows + embedding.reshape(b, f, -1).to(rows.dtype)
        return rows[:, None]
