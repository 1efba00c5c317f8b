"""The learned merge of a spatial output with its temporal refinement.

``out = a * spatial + (1 - a) * temporal`` with ``a = sigmoid(mix_factor)``; samples marked
image-only get ``a = 1`` exactly, so their output is the spatial one bit for bit. This is
diffusers' :class:`AlphaBlender` (``learned_with_images``), extended to the ``(b f) c h w``
layout the wrapped spatial blocks produce.
"""

from __future__ import annotations

import torch
from diffusers.models.resnet import AlphaBlender


class FrameAlphaBlender(AlphaBlender):
    """:class:`AlphaBlender` that also blends ``(b f) c h w`` feature maps."""

    def __init__(self, mix_factor: float) -> None:
        super().__init__(alpha=mix_factor, merge_strategy="learned_with_images")

    def get_alpha(self, image_only_indicator: torch.Tensor, ndims: int) -> torch.Tensor:
        if ndims == 4:
            # (b f) -> (b f) 1 1 1
            return super().get_alpha(image_only_indicator, 3)[..., None]
        return super().get_alpha(image_only_indicator, ndims)

    def alpha(self) -> torch.Tensor:
        """The current video-mode weight of the spatial branch, ``sigmoid(mix_factor)``."""
        return torch.sigmoid(self.mix_factor.detach())
