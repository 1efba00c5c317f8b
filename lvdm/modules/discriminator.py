"""The 3D-conv patch discriminator of the temporal decoder's training (Video LDM, after VQGAN's PatchGAN).

It scores overlapping (frames, height, width) patches of a video as real or decoded: a stack of ``Conv3d`` layers
with kernels ``(3, 4, 4)``, halving height and width (never time) at each level, so a patch spans a few frames and
the flicker between them is what it can see, and the decoder learns to remove.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator3D(nn.Module):
    """``(b, 3, f, h, w)`` in [-1, 1] -> patch logits ``(b, 1, f, h', w')``.

    Args:
        channels: the first level's width, doubled per level (at most 8x).
        levels: strided levels (each halves height and width).
    """

    def __init__(self, channels: int = 64, levels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(3, channels, (3, 4, 4), stride=(1, 2, 2), padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for level in range(1, levels):
            out = channels * min(2**level, 8)
            layers += [
                nn.Conv3d(width, out, (3, 4, 4), stride=(1, 2, 2), padding=1, bias=False),
                nn.GroupNorm(min(32, out // 4), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv3d(width, 1, (3, 3, 3), padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """VQGAN's hinge loss of the discriminator, per video ``(b,)``: real logits pushed above 1, fakes below -1."""
    dims = tuple(range(1, real.ndim))
    return 0.5 * (torch.relu(1 - real).mean(dims) + torch.relu(1 + fake).mean(dims))


def generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss, per video ``(b,)``: the negated logits of its videos (hinge GAN)."""
    return -fake.mean(tuple(range(1, fake.ndim)))


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's weight of the adversarial loss: ``|grad rec| / (|grad adv| + 1e-4)`` at the decoder's last layer,
    clamped to [0, 1e4] and detached, so the two losses pull that layer equally hard."""
    rec = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    adv = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (rec.norm() / (adv.norm() + 1e-4)).clamp(0, 1e4).detach()
