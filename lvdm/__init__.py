"""lvdm: turn Stable Diffusion into a video model (Video LDM) and fine-tune it on captioned video.

Names are imported on first use (PEP 562), so ``import lvdm.config`` checks a config without
importing torch or diffusers.
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LAYOUTS": "lvdm.models",
    "BaseModel": "lvdm.models",
    "LoraSpec": "lvdm.models",
    "TemporalLayout": "lvdm.models",
    "VideoUNet": "lvdm.models",
    "load_base": "lvdm.models",
    "CheckpointError": "lvdm.errors",
    "ConfigError": "lvdm.errors",
    "DataError": "lvdm.errors",
    "LvdmError": "lvdm.errors",
    "TemporalModuleError": "lvdm.errors",
    "Config": "lvdm.config",
    "load_config": "lvdm.config",
    "VideoPipeline": "lvdm.pipeline",
    "UpscalePipeline": "lvdm.upscale_pipeline",
    "VideoOutput": "lvdm.pipeline",
    "SamplingSettings": "lvdm.pipeline",
}

try:
    __version__ = _metadata.version("lvdm")
except _metadata.PackageNotFoundError:  # run from a checkout without installing
    __version__ = "0+unknown"

__all__ = [
    "BaseModel",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "LAYOUTS",
    "LoraSpec",
    "LvdmError",
    "TemporalLayout",
    "SamplingSettings",
    "TemporalModuleError",
    "UpscalePipeline",
    "VideoOutput",
    "VideoPipeline",
    "VideoUNet",
    "load_base",
    "load_config",
]

if TYPE_CHECKING:
    from lvdm.config import Config, load_config
    from lvdm.errors import CheckpointError, ConfigError, DataError, LvdmError, TemporalModuleError
    from lvdm.models import LAYOUTS, BaseModel, LoraSpec, TemporalLayout, VideoUNet, load_base
    from lvdm.pipeline import SamplingSettings, VideoOutput, VideoPipeline
    from lvdm.upscale_pipeline import UpscalePipeline


def _drop_torchvision_notice() -> None:
    """Without torchvision, transformers (5.x) says on every load of a diffusers pipeline that CLIP's and SigLIP's
    image processors fall back to PIL: two lines a user cannot act on, as lvdm reads no image through torchvision.
    Only that notice is dropped; transformers' other records reach the user as before."""
    import logging

    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision" not in record.getMessage()
    )


_drop_torchvision_notice()


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lvdm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
