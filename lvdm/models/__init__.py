"""Models: the video UNet and the loaders for bases, LoRAs and temporal module files."""

from lvdm.models.layout import LAYOUTS, TemporalLayout
from lvdm.models.loading import BaseModel, LoraSpec, load_base
from lvdm.models.temporal_file import read_temporal_file
from lvdm.models.video_unet import TemporalSite, VideoUNet

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
