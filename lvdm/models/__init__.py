"""Models: the video UNet and the loaders for bases, LoRAs and temporal module files.

The names below are imported on first use, so that the light submodules (:mod:`lvdm.models.family`,
:mod:`lvdm.models.layout`) load without diffusers: a command's ``--help`` and its argument checks stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lvdm.models.layout import LAYOUTS, TemporalLayout
    from lvdm.models.loading import BaseModel, LoraSpec, load_base
    from lvdm.models.temporal_file import read_temporal_file
    from lvdm.models.video_unet import TemporalSite, VideoUNet

_HOMES = {
    "LAYOUTS": "layout",
    "TemporalLayout": "layout",
    "BaseModel": "loading",
    "LoraSpec": "loading",
    "load_base": "loading",
    "read_temporal_file": "temporal_file",
    "TemporalSite": "video_unet",
    "VideoUNet": "video_unet",
}

__all__ = [
    "LAYOUTS",
    "BaseModel",
    "LoraSpec",
    "TemporalLayout",
    "TemporalSite",
    "VideoUNet",
    "load_base",
    "read_temporal_file",
]


def __getattr__(name: str) -> Any:
    """Each public name from its submodule, the first time it is asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module 'lvdm.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lvdm.models.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names too, before their first use (for completion in a REPL or an editor)."""
    return sorted({*globals(), *_HOMES})
