"""The learned merge of a spatial output with its temporal refinement.

``out = a * spatial + (1 - a) * temporal`` with ``a = sigmoid(mix_factor)``; samples marked
image-only take the spatial output itself (selected, not blended: under fp16 a temporal branch
that overflows would make ``1 * spatial + 0 * inf`` NaN), so their output is the spatial one bit
for bit whatever the temporal weights hold. This is diffusers' :class:`AlphaBlender`
(``learned_with_images``), extended to the ``(b f) c h w`` layout the wrapped spatial blocks produce.
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

    def forward(
        self, x_spatial: torch.Tensor, x_temporal: torch.Tensor, image_only_indicator: torch.Tensor | None = None
    ) -> torch.Tensor:
        mixed = super().forward(x_spatial, x_temporal, image_only_indicator)
        if image_only_indicator is None:
            return mixed
        # where a frame is an image, the spatial output as is
        if x_spatial.ndim == 5:
            images = image_only_indicator.bool()[:, None, :, None, None]  # b f -> b 1 f 1 1
        else:
            images = image_only_indicator.bool().reshape(-1, *([1] * (x_spatial.ndim - 1)))  # b f -> (b f) 1 1 [1]
        return torch.where(images, x_spatial, mixed)

    def alpha(self) -> torch.Tensor:
        """The current video-mode weight of the spatial branch, ``sigmoid(mix_factor)``."""
        return torch.sigmoid(self.mix_factor.detach())
