"""The models compared and the frozen parts around them, built from one spatial UNet config.

Three video models are built on copies of one spatial UNet and called the same way,
``forward(x (b, c, f, h, w), t (b,), text (b, n, d)) -> (b, c, f, h, w)``:

- ``lvdm``: :class:`~lvdm.models.VideoUNet` with the default Video LDM layout (temporal attention and 3D convs);
- ``lvdm-attn``: a VideoUNet with temporal attention only (``LAYOUTS["attention_only"]``), the layout closest to
  AnimateDiff's motion modules in size;
- ``lvdm-ad``: a VideoUNet of the ``animatediff`` layout: the same motion modules at the same sites as ``motion``;
- ``motion``: diffusers' ``UNetMotionModel.from_unet2d`` with an AnimateDiff v2 shaped ``MotionAdapter``
  (motion modules after every down/mid/up layer, 8 heads, mid block).

``image`` is the floor: the frozen image UNet's forward over the same ``b * f`` frames. All models have a frozen
base and the same attention backend (PyTorch SDPA).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# SD 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), random weights.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
# The same architecture at a fifth of the width (37.5M parameters): SD-shaped, CPU-sized.
SMALL_UNET: dict[str, Any] = {**SD15_UNET, "sample_size": 32, "block_out_channels": (64, 128, 256, 256)}
# SD 1.5's VAE (AutoencoderKL defaults but for these) and its CLIP ViT-L/14 text encoder.
SD15_VAE: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
SMALL_VAE: dict[str, Any] = {**SD15_VAE, "block_out_channels": (32, 64, 128, 128), "sample_size": 256}


def tiny_unet_config() -> dict[str, Any]:
    from lvdm.testing import tiny_unet

    return dict(tiny_unet("sd1").config)


# --------------------------------------------------------------------------------------------------- models
@dataclass
class VideoModel:
    """A model under test, called as ``forward(x (b, c, f, h, w), t (b,), text (b, n, d))``.

    Attributes:
        name: a key of :data:`MODELS` (or ``"image"``).
        module: the nn.Module (its parameters, dtype, device).
        forward: the call.
        set_checkpointing: the model's own gradient checkpointing switch (``None``: none).
        blocks: the down, mid and up blocks (for whole-block checkpointing).
        frame_context: the blocks read lvdm's frame context (a recomputation must re-enter it).
    """

    name: str
    module: nn.Module
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    set_checkpointing: Callable[[bool], Any] | None = None
    blocks: list[nn.Module] = field(default_factory=list)
    frame_context: bool = False

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def count(self, trainable: bool) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad == trainable)


def _unet_blocks(unet: nn.Module) -> list[nn.Module]:
    mid = [unet.mid_block] if unet.mid_block is not None else []
    return [*unet.down_blocks, *mid, *unet.up_blocks]


def _lvdm(layout_name: str) -> Callable[[nn.Module], VideoModel]:
    def build(unet: nn.Module) -> VideoModel:
        from lvdm.models import LAYOUTS, VideoUNet

        video = VideoUNet.from_unet2d(unet, LAYOUTS[layout_name]).freeze_base().set_attention_backend("sdpa")
        name = {"videoldm": "lvdm", "attention_only": "lvdm-attn", "animatediff": "lvdm-ad"}[layout_name]
        return VideoModel(
            name, video, video, video.enable_gradient_checkpointing, _unet_blocks(video.unet), frame_context=True
        )

    return build


def motion_adapter(unet_config: Mapping[str, Any]) -> nn.Module:
    """An AnimateDiff v2 shaped ``MotionAdapter`` for a UNet of this config (random weights)."""
    from diffusers import MotionAdapter

    return MotionAdapter(
        block_out_channels=tuple(unet_config["block_out_channels"]),
        motion_layers_per_block=unet_config["layers_per_block"],
        motion_norm_num_groups=unet_config["norm_num_groups"],
        motion_num_attention_heads=8,
        use_motion_mid_block=True,
    )


def _motion(unet: nn.Module) -> VideoModel:
    from diffusers import UNetMotionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = UNetMotionModel.from_unet2d(unet, motion_adapter(unet.config))
    model.freeze_unet2d_params()
    model.set_attn_processor(AttnProcessor2_0())

    def forward(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # UNetMotionModel takes the text once per frame: b n d -> (b f) n d
        return model(x, t, encoder_hidden_states=text.repeat_interleave(x.shape[2], dim=0)).sample

    def checkpointing(enabled: bool) -> None:
        model.enable_gradient_checkpointing() if enabled else model.disable_gradient_checkpointing()

    return VideoModel("motion", model, forward, checkpointing, _unet_blocks(model))


def image_model(unet: nn.Module) -> VideoModel:
    """The floor: the frozen image UNet run on every frame."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from lvdm.models.video_unet import image_unet_on_frames

    unet.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())

    def forward(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return image_unet_on_frames(unet, x, t, text)

    return VideoModel("image", unet, forward)


MODELS: dict[str, Callable[[nn.Module], VideoModel]] = {
    "lvdm": _lvdm("videoldm"),
    "lvdm-attn": _lvdm("attention_only"),
    "lvdm-ad": _lvdm("animatediff"),
    "motion": _motion,
}
LABELS = {
    "lvdm": "lvdm VideoUNet (videoldm layout)",
    "lvdm-attn": "lvdm VideoUNet (attention_only)",
    "lvdm-ad": "lvdm VideoUNet (animatediff layout)",
    "motion": "diffusers UNetMotionModel (AnimateDiff v2)",
    "image": "image UNet, frame by frame (floor)",
}


def spatial_unet(config: Mapping[str, Any], *, seed: int = 0) -> nn.Module:
    """A ``UNet2DConditionModel`` of ``config`` with diffusers' default init from ``seed``."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config(dict(config))


def meta_model(build: Callable[[nn.Module], VideoModel], unet_config: Mapping[str, Any]) -> VideoModel:
    """The model ``build`` makes, on the ``meta`` device: shapes only, built in about a second at SD size."""
    with torch.device("meta"):
        return build(spatial_unet(unet_config))


def build_all(unet: nn.Module, names: list[str]) -> dict[str, VideoModel]:
    """Each named model on its own copy of ``unet``; ``"image"`` gets ``unet`` itself."""
    models = {name: MODELS[name](copy.deepcopy(unet)) for name in names if name != "image"}
    if "image" in names:
        models["image"] = image_model(unet)
    return models


# --------------------------------------------------------------------------------------------------- components
def components(kind: str, seed: int = 0) -> dict[str, Any]:
    """The frozen parts around the UNet: ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (random weights).

    ``kind`` (a :class:`~benchmarks.harness.Size`'s ``components``): ``tiny``, lvdm.testing's; ``small``, SD's VAE
    at a quarter width and a 4-layer CLIP text encoder of SD's width; ``sd15``, SD 1.5's VAE and 12-layer CLIP
    ViT-L/14 text encoder. The tokenizer is lvdm.testing's byte-level one (no download), the scheduler SD's DDIM.
    """
    from lvdm import testing

    if kind == "tiny":
        return {"vae": testing.tiny_vae(seed), "text_encoder": testing.tiny_text_encoder("sd1", seed),
                "tokenizer": testing.tiny_tokenizer(), "scheduler": testing.tiny_scheduler("sd1")}  # fmt: skip
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = testing.tiny_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
        num_hidden_layers=12 if kind == "sd15" else 4, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**(SD15_VAE if kind == "sd15" else SMALL_VAE))
        text_encoder = CLIPTextModel(text_config)
    return {"vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": testing.tiny_scheduler("sd1")}  # fmt: skip
