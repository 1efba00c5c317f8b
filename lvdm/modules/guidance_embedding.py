"""The guidance scale as an input of the model: what a distilled student takes instead of a second, unconditional pass.

Meng et al.'s guided distillation makes the classifier-free guidance weight ``w`` an input: the student learns what the
teacher's guided output ``u + w (c - u)`` is from the conditional pass alone, so one forward per step serves every
``w`` in the range it was distilled for. :class:`GuidanceEmbedding` (a standalone part, kind ``guidance``) encodes
``w`` sinusoidally (as a timestep, ``w * 100``) and feeds it to the UNet two ways:

- through a two-layer MLP whose last layer starts at zero, added to the UNet's timestep embedding, which every
  ResNet block reads (Meng et al.'s embedding);
- as a per-channel gain on the output of every text cross-attention, ``out * (1 + g_l(w))`` with each ``g_l``
  starting at zero: guidance amplifies what the text adds, and a bias in the ResNets alone learns that slowly (on the
  demo, 150 steps took the student only a fifth of the way from the unguided model to the guided one).

Zero at init: a model that gets the part is unchanged until it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from lvdm.modules.frame_context import active_frames

SCALE = 100.0  # w = 7.5 encodes like timestep 750: the sinusoid's frequencies then tell 1.0 from 1.5 apart


@dataclass
class GuidanceFeatures:
    """What :meth:`GuidanceEmbedding.prepare` makes for one forward: ``(b f) d``, added to the timestep embedding."""

    time_embedding: torch.Tensor
    gains: list[torch.Tensor]  # per cross-attention, (b f) c: the output is multiplied by 1 + gain


class GuidanceEmbedding(nn.Module):
    """The guidance-scale part: ``w`` -> sinusoid -> Linear -> SiLU -> h; ``Linear(h)`` (zero) added to ``temb``, and
    ``Linear_l(h)`` (zero) the gain of cross-attention ``l``'s output.

    Args:
        width: the UNet's timestep-embedding width (``time_embedding.linear_2.out_features``).
        attention_channels: the output width of each text cross-attention, in the UNet's order.
        frequencies: sinusoidal channels of ``w``'s encoding.
    """

    inputs = ("guidance_scale",)

    def __init__(self, width: int, attention_channels: list[int], frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.linear_1 = nn.Linear(frequencies, width)
        self.linear_2 = nn.Linear(width, width)
        self.gains = nn.ModuleList(nn.Linear(width, channels) for channels in attention_channels)
        for layer in (self.linear_2, *self.gains):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def prepare(self, context: Any, sample: torch.Tensor, timestep: Any, guidance_scale: Any = None):
        """``guidance_scale``: a number or ``(b,)``, one per video; ``None`` adds nothing (the model as it was)."""
        if guidance_scale is None:
            return None
        b, f = sample.shape[0], sample.shape[2]
        w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=sample.device).reshape(-1)
        w = w.expand(b) if w.numel() == 1 else w
        if w.shape != (b,) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"guidance_scale must be a number or ({b},) finite weights, one per video; got {w}")
        encoded = get_timestep_embedding(w * SCALE, self.frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
        weight = self.linear_1.weight
        hidden = nn.functional.silu(self.linear_1(encoded.to(weight.dtype)))
        # b d -> (b f) d: every frame of a video at its weight
        return GuidanceFeatures(
            self.linear_2(hidden).repeat_interleave(f, dim=0),
            [gain(hidden).repeat_interleave(f, dim=0) for gain in self.gains],
        )


def _features() -> GuidanceFeatures | None:
    context = active_frames()
    extras = context.extras.values() if context is not None else ()
    return next((extra for extra in extras if isinstance(extra, GuidanceFeatures)), None)


def add_to_time_embedding(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the UNet's ``time_embedding``: adds the prepared guidance embedding, if any."""
    features = _features()
    return output if features is None else output + features.time_embedding.to(output.dtype)


def gain_hook(index: int):
    """A forward hook for cross-attention ``index``: its output ``(b f) n c`` times ``1 + gain``, if prepared."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        features = _features()
        if features is None:
            return output
        return output * (1 + features.gains[index].to(output.dtype)[:, None, :])

    return hook


def text_attentions(unet: nn.Module) -> list[nn.Module]:
    """The UNet's text cross-attentions (each spatial transformer block's ``attn2``), in module order."""
    return [m.attn2 for m in unet.modules() if getattr(m, "attn2", None) is not None and m.attn2.is_cross_attention]
