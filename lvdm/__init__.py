"""lvdm: turn Stable Diffusion into a video model (Video LDM) and fine-tune it on captioned video."""

from lvdm.errors import CheckpointError, LvdmError, TemporalModuleError
from lvdm.models import LAYOUTS, BaseModel, LoraSpec, TemporalLayout, VideoUNet, load_base

__all__ = [
    "LAYOUTS",
    "BaseModel",
    "CheckpointError",
    "LoraSpec",
    "LvdmError",
    "TemporalLayout",
    "TemporalModuleError",
    "VideoUNet",
    "load_base",
]
