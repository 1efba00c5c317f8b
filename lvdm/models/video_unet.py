"""VideoUNet: a frozen diffusers ``UNet2DConditionModel`` made into a video model.

The 2D UNet is extended in place (its spatial blocks are wrapped, never copied). In Video LDM's style a temporal
attention block follows every spatial transformer and a 3D-conv residual block every ResNet block, each merged
with the spatial output by a learned alpha; in AnimateDiff's, a motion module follows each layer where diffusers'
``UNetMotionModel`` has one (:class:`~lvdm.models.layout.TemporalLayout`). Every inserted branch starts as the
identity, so an untrained VideoUNet is the image UNet run frame by frame.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from lvdm.errors import TemporalModuleError
from lvdm.models.family import base_family
from lvdm.models.layout import TemporalLayout
from lvdm.models.parts import PartSpec
from lvdm.models.video_inputs import (
    check_class_labels,
    check_float,
    check_per_video,
    check_sample,
    check_table_positions,
    check_text,
    frame_timesteps,
    per_frame_flags,
    per_frame_positions,
    repeat_frames,
    text_width,
)
from lvdm.modules.frame_context import FrameContext, frame_context
from lvdm.modules.image_attention import with_image_tokens
from lvdm.modules.video_blocks import VideoWrapper, wrap_motion, wrap_resnet, wrap_transformer
from lvdm.modules.video_cross_attention import share_text_projections


@dataclass(frozen=True)
class TemporalSite:
    """One inserted temporal layer: where it sits in the UNet, what kind, how wide."""

    name: str
    kind: str  # "conv", "attention" or "motion" (an AnimateDiff motion module)
    channels: int
    heads: int | None = None  # attention and motion sites; None for conv

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "channels": self.channels, "heads": self.heads}


class VideoUNet(nn.Module):
    """A diffusers 2D UNet with interleaved temporal layers, on ``(b, c, f, h, w)`` latents.

    Build it with :meth:`from_unet2d` (a fresh temporal stack) or :meth:`from_temporal_file`
    (a trained one). The wrapped 2D UNet stays reachable as ``self.unet``.
    """

    def __init__(self, unet: UNet2DConditionModel, layout: TemporalLayout) -> None:
        super().__init__()
        self.layout = layout
        self.sites = _inflate(unet, layout)
        self.unet = unet
        self.parts = nn.ModuleDict()  # standalone added modules (lvdm.models.parts), by name
        self.part_specs: dict[str, PartSpec] = {}
        self._wrappers = {name: m for name, m in unet.named_modules() if isinstance(m, VideoWrapper)}
        for name, wrapper in self._wrappers.items():
            wrapper.site = name
        share_text_projections(unet)  # the text's keys and values once per video, not per frame

    # ----------------------------------------------------------------- the registry of added modules
    def added_modules(self) -> dict[str, nn.Module]:
        """Everything this model adds to the 2D UNet, by name: each wrapper's temporal layer and mixer
        (``down_blocks.0.resnets.0.temporal``) and each standalone part (``parts.<name>``).

        This one registry decides what trains, what :meth:`freeze_base` leaves trainable, what the optimizer,
        EMA and checkpoints hold and what a temporal module file stores.
        """
        added = {
            f"{name}.{attr}": module
            for name, wrapper in self._wrappers.items()
            for attr, module in wrapper.temporal_modules().items()
        }
        added |= {f"parts.{name}": module for name, module in self.parts.items()}
        return added

    def add_part(self, name: str, module: nn.Module, *, kind: str, config: dict[str, Any] | None = None) -> nn.Module:
        """Register a standalone trainable module (see :mod:`lvdm.models.parts`) under ``name``.

        ``kind`` and ``config`` are what a loader needs to rebuild it (``PART_KINDS[kind].build(video, **config)``)
        and are written to the module file. The module moves to the UNet's device and dtype (a half-precision
        pipeline adds its outputs to half-precision activations; training keeps what trains in fp32,
        :func:`lvdm.training.setup.build_model`); its parameters train.
        """
        if not name.isidentifier() or name in self.parts:
            raise ValueError(f"part name {name!r} must be a new Python identifier (have: {sorted(self.parts)})")
        param = next(self.unet.parameters())
        self.parts[name] = module.to(device=param.device, dtype=param.dtype)
        self.part_specs[name] = PartSpec(kind, dict(config or {}))
        for p in module.parameters():
            p.requires_grad_(True)
        return module

    def _added_ids(self) -> set[int]:
        return {id(p) for module in self.added_modules().values() for p in module.parameters()}

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_unet2d(cls, unet: UNet2DConditionModel, config: TemporalLayout | None = None) -> VideoUNet:
        """Inflate ``unet`` in place with the ``config`` layout (default: Video LDM's)."""
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"VideoUNet.from_unet2d needs a diffusers UNet2DConditionModel, got {type(unet).__name__}")
        if any(isinstance(m, VideoWrapper) for m in unet.modules()):
            raise ValueError("this UNet already has temporal layers: it was inflated before")
        param = next(unet.parameters())
        video = cls(unet, config or TemporalLayout())
        for wrapper in video._wrappers.values():
            for module in wrapper.temporal_modules().values():
                module.to(device=param.device, dtype=param.dtype)
        return video

    @classmethod
    def from_temporal_file(
        cls, unet: UNet2DConditionModel, path: str | os.PathLike, *, allow_pickle: bool = False
    ) -> VideoUNet:
        """Inflate ``unet`` with the layout recorded in a temporal module file, then load its weights.

        ``path`` may also be an AnimateDiff motion module (a checkpoint, ``.ckpt`` with ``allow_pickle``, or a
        diffusers ``MotionAdapter`` folder), imported on the way (:mod:`lvdm.models.animatediff`).
        """
        from lvdm.models.animatediff import open_temporal_module

        module = open_temporal_module(path, unet.config, allow_pickle=allow_pickle)
        if isinstance(unet, UNet2DConditionModel):  # checked on a copy of its shape first: a refused file left
            with torch.device("meta"):  # ``unet`` inflated, and the next file was refused as "inflated before"
                module.check_fits(_with_module(cls, UNet2DConditionModel.from_config(unet.config), module, path))
        video = _with_module(cls, unet, module, path)
        module.load_into(video)
        return video

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *,
        image_only_indicator: torch.Tensor | None = None,
        frame_positions: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        **conditioning: Any,
    ) -> torch.Tensor:
        """Denoise a batch of videos.

        Args:
            sample: latents ``(b, c, f, h, w)``.
            timestep: a scalar, ``(b,)`` (one per video) or ``(b, f)`` (one per frame).
            encoder_hidden_states: text embeddings ``(b, n, d)``, once per video.
            image_only_indicator: ``(b,)`` or ``(b, f)``; where 1 (or True) the temporal layers are
                bypassed exactly (images in joint training, "image mode").
            frame_positions: ``(f,)`` or ``(b, f)`` positions for the temporal attention's
                encoding; default ``0 .. f-1``.
            class_labels, added_cond_kwargs: per-video conditioning of the 2D UNet (noise level
                of the x4 upscaler, SDXL's pooled text and size ids), repeated for each frame; class labels
                for a UNet without a class embedding are an error.
            **conditioning: inputs of the standalone parts (each part's ``inputs``); a name no part takes is
                an error.

        Returns:
            the model output ``(b, c, f, h, w)`` (noise, v or sample, as the base predicts).
        """
        b, c, f, h, w = check_sample(sample, self.unet.config.in_channels)
        dtype = self.unet.conv_in.weight.dtype  # what the sample meets first; the text meets the same base weights
        check_float("sample", sample, dtype)
        check_text(encoder_hidden_states, b, text_width(self.unet.config))
        check_float("encoder_hidden_states", encoder_hidden_states, dtype)
        timesteps = frame_timesteps(timestep, b, f, sample.device)
        check_class_labels(class_labels, b, self.unet)
        check_per_video("added_cond_kwargs", added_cond_kwargs, b)
        context = FrameContext(
            num_frames=f,
            image_only_indicator=per_frame_flags(image_only_indicator, b, f, sample.device, sample.dtype),
            frame_positions=per_frame_positions(frame_positions, b, f, sample.device),
        )
        if self.layout.max_frames is not None:
            check_table_positions(context.frame_positions, frame_positions is None, self.layout.max_frames)
        self._prepare_parts(context, sample, timestep, conditioning)
        # b c f h w -> (b f) c h w, in the standard layout whatever the input's (channels-last inputs would reach
        # GroupNorm's channels-last backward kernel, which crashes on CPU in torch 2.13 for the 5D temporal blocks)
        frames = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).contiguous()
        tokens = context.image_tokens()  # the image part's, for the spatial cross-attentions (IP-Adapter style)
        text = with_image_tokens(repeat_frames(encoder_hidden_states, f), repeat_frames(tokens, f))
        with frame_context(context):
            out = self.unet(
                frames,
                timesteps,
                encoder_hidden_states=text,
                class_labels=repeat_frames(class_labels, f),
                added_cond_kwargs=repeat_frames(added_cond_kwargs, f),
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )[0]
        # (b f) c h w -> b c f h w
        return out.reshape(b, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    @property
    def conditioning_inputs(self) -> set[str]:
        """The keyword inputs of :meth:`forward` this model's parts take (``context_latents``, ...)."""
        return {key for part in self.parts.values() for key in getattr(part, "inputs", ())}

    def _prepare_parts(self, context: FrameContext, sample: torch.Tensor, timestep: Any, inputs: dict) -> None:
        """Give each part its inputs; what it prepares goes to ``context.extras`` under its name."""
        accepted = self.conditioning_inputs
        unknown = sorted(set(inputs) - accepted)
        if unknown:
            raise TypeError(
                f"VideoUNet.forward got unexpected conditioning {unknown}; this model's parts take "
                f"{sorted(accepted) or 'none'}"
            )
        for name, part in self.parts.items():
            prepare = getattr(part, "prepare", None)
            if prepare is not None:
                own = {key: inputs[key] for key in getattr(part, "inputs", ()) if key in inputs}
                context.extras[name] = prepare(context, sample, timestep, **own)

    # ----------------------------------------------------------------- parameters
    def named_temporal_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every added parameter (:meth:`added_modules`): those inside the 2D UNet named as there
        (``down_blocks.0.resnets.0.temporal.conv1.weight``), then the parts' own (``parts.fps.linear_1.weight``).

        Parameters a part installed inside the UNet (attention processors, hooks' modules) are named by their
        UNet path, so a file written from one base loads onto another.
        """
        added, seen = self._added_ids(), set()
        for name, param in self.unet.named_parameters():
            if id(param) in added:
                seen.add(id(param))
                yield name, param
        for name, param in self.parts.named_parameters(prefix="parts"):
            if id(param) not in seen:
                yield name, param

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        """The new (trainable) parameters: temporal layers, their mixing alphas and the standalone parts."""
        for _, param in self.named_temporal_parameters():
            yield param

    def base_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of the 2D UNet this model was built from."""
        added = self._added_ids()
        for param in self.unet.parameters():
            if id(param) not in added:
                yield param

    def freeze_base(self) -> VideoUNet:
        """Stop gradients to the 2D UNet's weights; everything in the registry (:meth:`added_modules`) trains."""
        for param in self.base_parameters():
            param.requires_grad_(False)
        for param in self.temporal_parameters():
            param.requires_grad_(True)
        return self

    def temporal_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the new parameters, detached, keyed as in :meth:`named_temporal_parameters`."""
        return {name: param.detach() for name, param in self.named_temporal_parameters()}

    def mix_alphas(self) -> dict[str, float]:
        """Each inserted layer's current spatial weight ``a`` (1: spatial only, 0: temporal only)."""
        return {name: float(w.mixer.alpha()) for name, w in self._wrappers.items() if w.mixer is not None}

    def parameter_summary(self) -> str:
        """One line: temporal vs base parameter counts."""
        temporal = sum(p.numel() for p in self.temporal_parameters())
        base = sum(p.numel() for p in self.base_parameters())
        return (
            f"temporal parameters: {temporal:,} in {len(self.sites)} layers "
            f"({100 * temporal / max(base, 1):.1f}% of the {base:,} base parameters)"
        )

    # ----------------------------------------------------------------- runtime switches
    def enable_gradient_checkpointing(self, enabled: bool = True) -> VideoUNet:
        """Recompute each (spatial + temporal) block in backward instead of keeping its activations."""
        for wrapper in self._wrappers.values():
            wrapper.gradient_checkpointing = enabled
        return self

    def compile_blocks(self) -> VideoUNet:
        """Regional ``torch.compile``: each spatial block and temporal layer compiled on its own, with static shapes
        (:mod:`lvdm.models.compile`); results equal eager ones within float tolerance."""
        from lvdm.models.compile import compile_blocks, spatial_blocks

        temporal = [wrapper.temporal for wrapper in self._wrappers.values()]
        compile_blocks(spatial_blocks(self.unet) + temporal, next(self.parameters()).device)
        return self

    def set_attention_backend(self, backend: str) -> VideoUNet:
        """``"sdpa"`` (PyTorch scaled-dot-product attention, the default) or ``"xformers"``."""
        from lvdm.models.attention import set_attention_backend

        set_attention_backend(self, backend)
        return self

    # ----------------------------------------------------------------- files
    @property
    def family(self) -> str:
        return base_family(self.unet.config)

    def save_temporal(
        self, path: str | os.PathLike, *, training_config: dict[str, Any] | None = None, exclusive: bool = False
    ) -> None:
        """Write the temporal layers (only) to a safetensors file with their layout and config; ``exclusive``: a
        ``path`` that exists by the time it is written is an error, left as it is."""
        from lvdm.models.temporal_file import write_temporal_file

        write_temporal_file(self, path, training_config=training_config, exclusive=exclusive)

    def load_temporal(self, path: str | os.PathLike) -> VideoUNet:
        """Load temporal weights saved by :meth:`save_temporal` (or an AnimateDiff motion module of this model's
        layout); a layout mismatch is a clear error."""
        from lvdm.models.animatediff import open_temporal_module

        open_temporal_module(path, self.unet.config).load_into(self)
        return self


def _with_module(cls: type[VideoUNet], unet: UNet2DConditionModel, module: Any, path: Any) -> VideoUNet:
    """``unet`` inflated with the layout of the temporal module ``module`` and given its parts (weights not loaded)."""
    try:
        video = cls.from_unet2d(unet, module.layout)
    except ValueError as exc:  # e.g. a head count the base's channels do not divide into
        raise TemporalModuleError(f"{path}: its layout does not fit this base: {exc}") from exc
    module.add_parts(video)
    return video


# --------------------------------------------------------------------- inflation
def _inflate(unet: UNet2DConditionModel, layout: TemporalLayout) -> list[TemporalSite]:
    """Wrap the ResNet and transformer blocks of the down, mid and up paths in place, as ``layout`` says."""
    sites = []
    mid = [("mid_block", unet.mid_block)] if unet.mid_block is not None and layout.mid_block else []
    named = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)] + mid
    named += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for block_name, block in named:
        if layout.style == "animatediff":
            sites += _inflate_motion(block_name, block, layout, unet.config.norm_num_groups)
        else:
            sites += _inflate_block(block_name, block, layout)
    return sites


def _inflate_motion(block_name: str, block: nn.Module, layout: TemporalLayout, norm_groups: int) -> list[TemporalSite]:
    """One motion module per layer, where ``UNetMotionModel`` has it: after the layer's transformer, or after its
    ResNet in a block without transformers; in the mid block after each transformer (before the next ResNet)."""
    sites = []
    attentions = getattr(block, "attentions", None) or ()
    layers = len(attentions) if block_name == "mid_block" else len(block.resnets)
    for i in range(layers):
        kind, modules = ("attentions", attentions) if i < len(attentions) else ("resnets", block.resnets)
        spatial = modules[i]
        if not isinstance(spatial, (Transformer2DModel, ResnetBlock2D)):
            raise TypeError(f"{block_name}.{kind}.{i} is a {type(spatial).__name__}, expected a diffusers SD block")
        modules[i] = wrapper = wrap_motion(
            spatial,
            num_heads=layout.attention_heads,
            depth=layout.attention_depth,
            norm_groups=norm_groups,
            max_frames=layout.max_frames,
        )
        channels = wrapper.temporal.in_channels
        sites.append(TemporalSite(f"{block_name}.{kind}.{i}", "motion", channels, layout.attention_heads))
    return sites


def _inflate_block(block_name: str, block: nn.Module, layout: TemporalLayout) -> list[TemporalSite]:
    sites = []
    for i, resnet in enumerate(block.resnets):
        if layout.conv:
            if not isinstance(resnet, ResnetBlock2D):
                raise TypeError(f"{block_name}.resnets.{i} is a {type(resnet).__name__}, expected ResnetBlock2D")
            block.resnets[i] = wrap_resnet(resnet, kernel_size=layout.conv_kernel, mix_factor=layout.mix_factor)
            sites.append(TemporalSite(f"{block_name}.resnets.{i}", "conv", resnet.out_channels))
        if layout.attention and i < len(getattr(block, "attentions", ())):
            attn = block.attentions[i]
            if not isinstance(attn, Transformer2DModel):
                raise TypeError(f"{block_name}.attentions.{i} is a {type(attn).__name__}, expected Transformer2DModel")
            wrapper = wrap_transformer(
                attn, num_heads=layout.attention_heads, depth=layout.attention_depth, mix_factor=layout.mix_factor
            )
            block.attentions[i] = wrapper
            heads = wrapper.temporal.blocks[0].attn1.heads
            sites.append(TemporalSite(f"{block_name}.attentions.{i}", "attention", attn.config.in_channels, heads))
    return sites


# --------------------------------------------------------------------- frames alone
def image_unet_on_frames(
    unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: Any, **per_video: Any
) -> torch.Tensor:
    """A 2D UNet run on every frame alone: ``sample`` ``(b, c, f, h, w)`` in, ``(b, c', f, h, w)`` out. Each video's
    timestep ``(b,)``, text ``(b, n, d)`` (or ``(text, [image tokens])``) and ``per_video`` inputs (``class_labels``
    ``(b,)``...) go to its frames.
    Image mode without temporal layers, and the floor every video model is measured against."""
    b, c, f, h, w = sample.shape
    frames = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # b c f h w -> (b f) c h w
    per_frame = {key: repeat_frames(value, f) for key, value in per_video.items()}
    out = unet(frames, frame_timesteps(timestep, b, f, sample.device), repeat_frames(encoder_hidden_states, f),
               return_dict=False, **per_frame)[0]  # fmt: skip
    return out.reshape(b, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)  # (b f) c h w -> b c f h w
