"""Motion-speed conditioning: the clip's frame rate reaches the temporal layers, and only them.

VideoCrafter1 embeds the frame rate like a timestep (sinusoids, then a 2-layer MLP) and adds it to the
timestep embedding, which every ResNet of the UNet reads. Here the spatial UNet is frozen and shared with the
image model, so that cannot work: adding anything to the timestep embedding changes every spatial ResNet's
output, image mode would no longer be the base model, and the trained module would carry a change to weights
it does not own (transfer onto another checkpoint would apply it to layers it was never trained with). So
:class:`FpsEmbedding` (a standalone part, kind ``fps``) feeds the **temporal layers only**: the embedding goes
through one projection per temporal layer and is added inside that layer's branch after its normalisation, where
the timestep embedding enters the 3D-conv block and the frame-position encoding the attention block
(:meth:`~lvdm.modules.frame_context.FrameContext.temporal_embedding`); added before the GroupNorm, a per-channel
constant is partly normalised away. The MLP's last layer starts at zero (and the per-layer projections have no
bias), so a model with FPS conditioning computes exactly what the same model without it does until it trains.

A call without ``fps`` adds nothing (the untrained behaviour); training always passes each clip's rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


def _key(site: str) -> str:
    return site.replace(".", "__")


@dataclass(frozen=True)
class FpsFeatures:
    """One forward's FPS embedding ``(b f, width)`` (per frame), projected per temporal layer on demand."""

    part: FpsEmbedding
    embedding: torch.Tensor

    def embedding_at(self, site: str) -> torch.Tensor | None:
        """What the temporal layer ``site`` adds to its normalised hidden state, per frame: ``(b f) c``."""
        key = _key(site)
        if key not in self.part.project:
            return None
        return self.part.project[key](self.embedding)


class FpsEmbedding(nn.Module):
    """The FPS conditioning part (see the module notes).

    Args:
        sites: ``(name, channels)`` of every temporal layer to feed.
        width: the MLP's width (the UNet's first block width).
        frequencies: sinusoidal channels of the rate's encoding.
    """

    inputs = ("fps",)

    def __init__(self, sites: Sequence[tuple[str, int]], width: int, frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.linear_1 = nn.Linear(frequencies, width)
        self.linear_2 = nn.Linear(width, width)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)
        self.project = nn.ModuleDict({_key(name): nn.Linear(width, channels, bias=False) for name, channels in sites})

    def prepare(self, context, sample: torch.Tensor, timestep, fps: torch.Tensor | float | None = None):
        """``fps``: a number or ``(b,)`` frames per second, one per video; ``None`` adds nothing."""
        if fps is None:
            return None
        b, f = sample.shape[0], sample.shape[2]
        rates = torch.as_tensor(fps, dtype=torch.float32, device=sample.device).reshape(-1)
        if rates.numel() == 1:
            rates = rates.expand(b)
        if rates.shape != (b,) or not bool(torch.isfinite(rates).all()) or bool((rates < 0).any()):
            raise ValueError(f"fps must be a number or ({b},) finite rates >= 0, one per video; got {fps!r}")
        encoded = get_timestep_embedding(rates, self.frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
        weight = self.linear_1.weight
        embedding = self.linear_2(nn.functional.silu(self.linear_1(encoded.to(weight.dtype))))
        # b d -> (b f) d: every frame of a video at its rate
        return FpsFeatures(self, nn.functional.silu(embedding).repeat_interleave(f, dim=0))
