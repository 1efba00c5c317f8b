"""Attention backend selection: PyTorch SDPA by default, xformers when installed and asked for.

Only diffusers' stock processors are swapped: a processor another part installed (the image
cross-attention's extra K/V, a LoRA-aware or custom processor) is kept, whatever the backend.
"""

from __future__ import annotations

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor
from torch import nn

from lvdm.config import XFORMERS_MISSING
from lvdm.errors import ConfigError
from lvdm.modules.video_cross_attention import VideoCrossAttnProcessor, share_text_projections

BACKENDS = ("sdpa", "xformers")
STOCK_PROCESSORS = (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor, VideoCrossAttnProcessor)


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Switch every stock attention processor in ``model`` (spatial and temporal) to ``backend``; with SDPA the
    spatial cross-attentions project the text once per video (:mod:`lvdm.modules.video_cross_attention`).

    Returns how many layers were switched; layers with a custom processor are left as they are.
    """
    if backend == "sdpa":
        make = AttnProcessor2_0
    elif backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as exc:
            raise ConfigError(XFORMERS_MISSING) from exc
        make = XFormersAttnProcessor
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    switched = 0
    for module in model.modules():
        if isinstance(module, Attention) and type(module.processor) in STOCK_PROCESSORS:
            module.set_processor(make())
            switched += 1
    if backend == "sdpa":
        share_text_projections(model)
    return switched
