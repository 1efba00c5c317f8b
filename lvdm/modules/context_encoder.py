"""Context frames: the clean frames a user gives (to continue or interpolate a video) reach the temporal layers.

Video LDM (Blattmann et al. 2023, sec. 3.1.1) turns the text-to-video model into a predictor and an interpolator
by masking: the context latents ``m * z`` (the given frames, zero elsewhere) and the binary mask ``m`` go through a
learned downsampling encoder, and its features are added to the inputs of the **temporal** layers. The spatial
layers never see them, so image mode and transfer onto other bases are untouched.

:class:`ContextEncoder` is that encoder, a standalone part of a :class:`~lvdm.models.VideoUNet` (kind
``context``): a per-frame conv stem on ``[m * z, m]`` plus a learned **flag** (which task: 0 generation or
prediction, 1 interpolation, 2 fine interpolation, the paper's flag telling the ``T -> 4T`` and ``4T -> 16T``
stages apart), then one stride-2 conv per UNet resolution, and a zero-initialised 1x1 projection per temporal
layer. Until it trains every projection is zero, so a model with context support computes exactly what the same
model without it computes, for every task.

Each temporal layer reads its feature with :meth:`ContextFeatures.at` (through
:meth:`~lvdm.modules.frame_context.FrameContext.temporal_input`); projections run inside the layer, so only one
feature map per resolution is held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

FLAGS = {"none": 0, "interpolate": 1, "interpolate_fine": 2}
"""The learned task flag's values: generation and prediction share 0 (the mask tells them apart)."""


def site_level(site: str, num_levels: int) -> int:
    """The UNet resolution level (0: full latent size) a temporal site named ``site`` runs at.

    ``down_blocks.i`` run at level ``i``, the mid block at the lowest, ``up_blocks.j`` at ``num_levels - 1 - j``
    (diffusers' blocks resample after their layers).
    """
    head, _, rest = site.partition(".")
    if head == "mid_block":
        return num_levels - 1
    index = int(rest.partition(".")[0])
    if head == "down_blocks":
        return index
    if head == "up_blocks":
        return num_levels - 1 - index
    raise ValueError(f"cannot tell the resolution of temporal site {site!r}")


def _key(site: str) -> str:
    return site.replace(".", "__")


@dataclass(frozen=True)
class ContextFeatures:
    """One forward's context features: a ``(b f) c h w`` map per resolution level, projected per site on demand."""

    encoder: ContextEncoder
    levels: list[torch.Tensor]

    def at(self, site: str) -> torch.Tensor | None:
        """The feature added to the input of the temporal layer ``site``: ``(b f) c h w``, or ``None`` if the
        encoder has no projection for it."""
        key = _key(site)
        if key not in self.encoder.project:
            return None
        return self.encoder.project[key](self.levels[self.encoder.levels_of[site]])


class ContextEncoder(nn.Module):
    """The context encoder part (see the module notes).

    Args:
        latent_channels: channels of the latents ``z``.
        level_channels: the UNet's ``block_out_channels``, one width per resolution level.
        sites: ``(name, channels)`` of every temporal layer to feed.
        num_flags: values of the task flag.
    """

    inputs = ("context_latents", "context_mask", "context_flag")

    def __init__(
        self, latent_channels: int, level_channels: Sequence[int], sites: Sequence[tuple[str, int]], num_flags: int = 3
    ) -> None:
        super().__init__()
        widths = list(level_channels)
        self.latent_channels = latent_channels
        self.stem = nn.Conv2d(latent_channels + 1, widths[0], 3, padding=1)
        self.flag = nn.Embedding(num_flags, widths[0])
        nn.init.zeros_(self.flag.weight)
        self.down = nn.ModuleList(
            nn.Conv2d(widths[max(i - 1, 0)], widths[i], 3, stride=1 if i == 0 else 2, padding=1)
            for i in range(len(widths))
        )
        self.levels_of = {name: site_level(name, len(widths)) for name, _ in sites}
        self.project = nn.ModuleDict()
        for name, channels in sites:
            conv = nn.Conv2d(widths[self.levels_of[name]], channels, 1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.project[_key(name)] = conv

    def prepare(
        self,
        context,
        sample: torch.Tensor,
        timestep,
        context_latents: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        context_flag: torch.Tensor | None = None,
    ) -> ContextFeatures:
        """Encode the given frames of ``sample``'s videos; no context (text-to-video) is an all-zero mask.

        ``context_latents``: ``(b, c, f, h, w)`` clean latents (only frames where the mask is 1 are read);
        ``context_mask``: ``(b, f)``, 1 where a frame is given; ``context_flag``: ``(b,)`` ints (:data:`FLAGS`).
        """
        b, c, f, h, w = sample.shape
        mask = context_mask_tensor(context_mask, b, f, sample.device)
        if context_latents is None:
            if bool(mask.any()):
                raise ValueError("context_mask marks given frames but no context_latents were passed")
            latents = torch.zeros_like(sample)
        else:
            latents = context_latents.to(device=sample.device, dtype=sample.dtype)
            if latents.shape != sample.shape:
                raise ValueError(
                    f"context_latents have shape {tuple(latents.shape)}, the sample {tuple(sample.shape)}: give one "
                    "latent per frame (zeros where not given)"
                )
        flags = torch.zeros(b, dtype=torch.long, device=sample.device) if context_flag is None else context_flag
        flags = torch.as_tensor(flags, device=sample.device).long().reshape(-1).expand(b)
        # b f -> b 1 f 1 1: the mask as a channel
        m = mask.to(sample.dtype)[:, None, :, None, None].expand(b, 1, f, h, w)
        x = torch.cat([latents * m, m], dim=1)
        # b c f h w -> (b f) c h w
        x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c + 1, h, w)
        weight = self.stem.weight
        x = self.stem(x.to(weight.dtype)) + self.flag(flags).repeat_interleave(f, dim=0)[:, :, None, None]
        levels = []
        for conv in self.down:
            x = conv(nn.functional.silu(x))
            levels.append(x)
        return ContextFeatures(self, levels)


def with_clean_context(model_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``model_fn(x, t, **cond)`` that shows the model its given frames clean: where ``cond["context_mask"]`` is set,
    the frames of ``x`` are replaced by ``cond["context_latents"]`` and their timestep by 0 (per-frame timesteps
    ``(b, f)``); calls without a mask, or with an empty one, pass through unchanged.

    Training (:mod:`lvdm.training.tasks`) and sampling (:mod:`lvdm.context_sampling`) both call the model this way,
    so the temporal layers read the given frames directly, not only through the context encoder; the pass without
    the given frames (context guidance, the context gain's baseline) sees them noised to ``t`` like the rest.
    """

    def fn(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        mask = cond.get("context_mask")
        if mask is None or not bool(torch.as_tensor(mask).any()):
            return model_fn(x, t, **cond)
        b, f = x.shape[0], x.shape[2]
        mask = context_mask_tensor(mask, b, f, x.device)
        # b f -> b 1 f 1 1
        x = torch.where(mask[:, None, :, None, None], cond["context_latents"].to(x.dtype), x)
        t = torch.as_tensor(t, device=x.device)
        per_frame = t.reshape(-1, 1).expand(b, f) if t.ndim <= 1 else t
        per_frame = torch.where(mask, torch.zeros_like(per_frame), per_frame)
        return model_fn(x, per_frame, **cond)

    return fn


def context_mask_tensor(mask: torch.Tensor | None, b: int, f: int, device: torch.device) -> torch.Tensor:
    """``mask`` as ``(b, f)`` bool (``None``: nothing given); ``(f,)`` is shared by every video."""
    if mask is None:
        return torch.zeros(b, f, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device)
    if mask.shape == (f,):
        mask = mask[None].expand(b, f)
    if mask.shape != (b, f):
        raise ValueError(f"context_mask must have shape ({f},) or ({b}, {f}), got {tuple(mask.shape)}")
    return mask.bool()
