"""Attention backend selection: PyTorch SDPA by default, xformers when installed and asked for."""

from __future__ import annotations

from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

BACKENDS = ("sdpa", "xformers")


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Switch every diffusers attention layer in ``model`` (spatial and temporal) to ``backend``."""
    if backend == "sdpa":
        model.set_attn_processor(AttnProcessor2_0())
    elif backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "attention backend 'xformers' asked for, but xformers is not installed: pip install 'lvdm[xformers]'"
            ) from exc
        model.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
