"""Tiny offline stand-ins for what users bring: SD-shaped models, their weights files (and, later, clips).

Shared by the tests, the benchmarks and the embedded demo. Everything is seeded and built in code.
"""

from lvdm.testing.checkpoints import LORA_FORMATS, write_lora, write_single_file_checkpoint
from lvdm.testing.models import (
    FLAVOURS,
    Flavour,
    make_tiny_sd,
    tiny_clip_vision,
    tiny_scheduler,
    tiny_sd_components,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_upscaler_unet,
    tiny_vae,
)
from lvdm.testing.upscaler import make_tiny_upscaler, tiny_upscaler_vae

__all__ = [
    "FLAVOURS",
    "LORA_FORMATS",
    "Flavour",
    "make_tiny_sd",
    "make_tiny_upscaler",
    "tiny_clip_vision",
    "tiny_scheduler",
    "tiny_sd_components",
    "tiny_text_encoder",
    "tiny_tokenizer",
    "tiny_unet",
    "tiny_upscaler_unet",
    "tiny_upscaler_vae",
    "tiny_vae",
    "write_lora",
    "write_single_file_checkpoint",
]
