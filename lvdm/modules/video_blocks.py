"""In-place wrappers pairing each spatial block of a diffusers UNet with its temporal partner.

A wrapper takes the spatial block's place in its ``ModuleList``, is called exactly as the
spatial block was (diffusers' down/mid/up blocks are untouched), runs the spatial block,
then the temporal layer, and merges the two: with a learned alpha (Video LDM), or by the motion
module's own residual (AnimateDiff, :class:`MotionResnetBlock` / :class:`MotionTransformerBlock`).
The frame layout comes from :func:`~lvdm.modules.frame_context.current_frames`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn
from torch.utils.checkpoint import checkpoint

from lvdm.modules.alpha_blend import FrameAlphaBlender
from lvdm.modules.frame_context import FrameContext, current_frames, frame_context
from lvdm.modules.motion_module import MotionModule
from lvdm.modules.temporal_attention import TemporalAttentionBlock
from lvdm.modules.temporal_conv import TemporalConvBlock


class VideoWrapper(nn.Module):
    """The base of every wrapper (how :class:`~lvdm.models.VideoUNet` finds them in a UNet), with their shared
    parts: the spatial block, the temporal block, the mixer (``None`` for motion modules), and checkpointing."""

    def __init__(self, spatial: nn.Module, temporal: nn.Module, mix_factor: float | None) -> None:
        super().__init__()
        self.spatial = spatial
        self.temporal = temporal
        self.mixer = FrameAlphaBlender(mix_factor) if mix_factor is not None else None
        self.gradient_checkpointing = False
        self.site = ""  # its name in the UNet (set by VideoUNet): the key of the parts' temporal inputs

    def temporal_modules(self) -> dict[str, nn.Module]:
        """The trainable parts, by attribute name."""
        return {"temporal": self.temporal} | ({"mixer": self.mixer} if self.mixer is not None else {})

    def _run(self, fn: Any, *args: Any) -> Any:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # the frame context travels as an argument: recomputation happens after forward has returned, so it is
            # made current again there for what reads it inside the spatial block (the cross-attention processors)
            return checkpoint(_in_context, fn, current_frames(), *args, use_reentrant=False)
        return fn(*args, current_frames())


def _in_context(fn: Any, ctx: FrameContext, *args: Any) -> Any:
    with frame_context(ctx):
        return fn(*args, ctx)


class VideoResnetBlock(VideoWrapper):
    """A diffusers ``ResnetBlock2D`` followed by a :class:`TemporalConvBlock`."""

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        return self._run(lambda x, t, ctx: self._forward(x, t, ctx, *args, **kwargs), hidden_states, temb)

    def _forward(
        self, x: torch.Tensor, temb: torch.Tensor | None, ctx: FrameContext, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        spatial = self.spatial(x, temb, *args, **kwargs)
        b, f = ctx.batch_size, ctx.num_frames
        # (b f) c h w -> b c f h w
        video = spatial.reshape(b, f, *spatial.shape[1:]).permute(0, 2, 1, 3, 4)
        # (b f) d -> b f d
        temb_frames = temb.reshape(b, f, -1) if temb is not None else None
        extra = ctx.temporal_input(self.site)
        if extra is not None:
            # (b f) c h w -> b c f h w
            extra = extra.reshape(b, f, *extra.shape[1:]).permute(0, 2, 1, 3, 4)
        embedding = ctx.temporal_embedding(self.site)
        if embedding is not None:
            # (b f) c -> b c f 1 1
            embedding = embedding.reshape(b, f, -1).permute(0, 2, 1)[..., None, None]
        temporal = self.temporal(video, temb_frames, extra, embedding)
        # b c f h w -> (b f) c h w
        temporal = temporal.permute(0, 2, 1, 3, 4).reshape(spatial.shape)
        return self.mixer(spatial, temporal, ctx.image_only_indicator)


class VideoTransformerBlock(VideoWrapper):
    """A diffusers ``Transformer2DModel`` followed by a :class:`TemporalAttentionBlock`."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any):
        out = self._run(lambda x, ctx: self._forward(x, ctx, *args, **kwargs), hidden_states)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _forward(self, x: torch.Tensor, ctx: FrameContext, *args: Any, **kwargs: Any) -> torch.Tensor:
        spatial = self.spatial(x, *args, return_dict=False, **kwargs)[0]
        temporal = self.temporal(
            spatial,
            ctx.num_frames,
            ctx.frame_positions,
            ctx.temporal_input(self.site),
            ctx.temporal_embedding(self.site),
        )
        return self.mixer(spatial, temporal, ctx.image_only_indicator)


class _MotionWrapper(VideoWrapper):
    """A spatial block followed by an AnimateDiff :class:`MotionModule`, which adds its own residual (no alpha)."""

    def _motion(self, spatial: torch.Tensor, ctx: FrameContext) -> torch.Tensor:
        out = self.temporal(
            spatial,
            ctx.num_frames,
            ctx.frame_positions,
            ctx.temporal_input(self.site),
            ctx.temporal_embedding(self.site),
        )
        # where a frame is an image, the spatial output as is: (b f) -> (b f) 1 1 1
        images = ctx.image_only_indicator.bool().reshape(-1, 1, 1, 1)
        return torch.where(images, spatial, out)


class MotionResnetBlock(_MotionWrapper):
    """A diffusers ``ResnetBlock2D`` followed by a motion module (the sites of blocks without transformers)."""

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        return self._run(lambda x, t, ctx: self._motion(self.spatial(x, t, *args, **kwargs), ctx), hidden_states, temb)


class MotionTransformerBlock(_MotionWrapper):
    """A diffusers ``Transformer2DModel`` followed by a motion module."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any):
        out = self._run(
            lambda x, ctx: self._motion(self.spatial(x, *args, return_dict=False, **kwargs)[0], ctx), hidden_states
        )
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def wrap_motion(
    spatial: nn.Module, *, num_heads: int, depth: int, norm_groups: int, max_frames: int
) -> _MotionWrapper:
    """Pair a ``Transformer2DModel`` or a ``ResnetBlock2D`` with a zero-initialised motion module of its width."""
    if hasattr(spatial, "transformer_blocks"):
        channels, wrapper = spatial.config.in_channels, MotionTransformerBlock
    else:
        channels, wrapper = spatial.out_channels, MotionResnetBlock
    temporal = MotionModule(channels, num_heads, depth=depth, norm_groups=norm_groups, max_frames=max_frames)
    return wrapper(spatial, temporal, None)


def wrap_resnet(resnet: nn.Module, *, kernel_size: tuple[int, int, int], mix_factor: float) -> VideoResnetBlock:
    """Pair a ``ResnetBlock2D`` with a zero-initialised temporal conv block of its width."""
    temporal = TemporalConvBlock(
        resnet.out_channels,
        temb_channels=resnet.time_emb_proj.in_features if resnet.time_emb_proj is not None else None,
        kernel_size=kernel_size,
        norm_groups=resnet.norm2.num_groups,
    )
    return VideoResnetBlock(resnet, temporal, mix_factor)


def wrap_transformer(
    transformer: nn.Module, *, num_heads: int | None, depth: int, mix_factor: float
) -> VideoTransformerBlock:
    """Pair a ``Transformer2DModel`` with a zero-initialised temporal attention block of its width.

    ``num_heads=None`` takes the spatial self-attention's head count.
    """
    channels = transformer.config.in_channels
    heads = num_heads or transformer.transformer_blocks[0].attn1.heads
    temporal = TemporalAttentionBlock(channels, heads, depth=depth, norm_groups=transformer.norm.num_groups)
    return VideoTransformerBlock(transformer, temporal, mix_factor)
