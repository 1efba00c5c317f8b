"""nn.Modules only: the temporal layers and the wrappers that pair them with spatial blocks."""

from lvdm.modules.alpha_blend import FrameAlphaBlender
from lvdm.modules.frame_context import FrameContext, current_frames, frame_context
from lvdm.modules.temporal_attention import TemporalAttentionBlock
from lvdm.modules.temporal_conv import TemporalConvBlock
from lvdm.modules.video_blocks import VideoResnetBlock, VideoTransformerBlock

__all__ = [
    "FrameAlphaBlender",
    "FrameContext",
    "TemporalAttentionBlock",
    "TemporalConvBlock",
    "VideoResnetBlock",
    "VideoTransformerBlock",
    "current_frames",
    "frame_context",
]
