"""What image and FPS conditioning cost in a training step (issue 12).

``python -m benchmarks --only image`` (any device). The same inflated UNet three ways, interleaved: plain
text-to-video; with the FPS part (each clip's rate); with the image part, where each step also runs the frozen
CLIP vision encoder on one frame per clip (as training does: the tokens of the conditioning frame, not cached)
and every spatial cross-attention gets the image attention. Forward, MSE loss, backward, AdamW step.

The encoder is sized like the UNet: the tiny test encoder, a 6-layer ViT-B/16-like encoder for ``small``, and
CLIP ViT-H/14 (IP-Adapter Plus's SD 1.5 encoder, 632M parameters) for ``sd15``.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness import Size, temporal_step, time_round_robin
from benchmarks.report import target

ENCODERS = {  # CLIPVisionConfig fields per benchmark size
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                  image_size=224, patch_size=16, projection_dim=384),
    "sd15": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                 image_size=224, patch_size=14, projection_dim=1024),
}  # fmt: skip


def _encoder(size: Size, device: torch.device) -> Any:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from lvdm.models.encoders import ImageEncoder
    from lvdm.testing import tiny_clip_vision

    torch.manual_seed(0)
    fields = ENCODERS.get(size.name)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**fields)) if fields else tiny_clip_vision()
    model.requires_grad_(False).eval().to(device)
    s = model.config.image_size
    return ImageEncoder(model, CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}))


def _models(size: Size, device: torch.device, encoder: Any) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    from lvdm.models import VideoUNet
    from lvdm.models.parts import build_part

    models = {}
    for name, kind in (("text to video", None), ("fps", "fps"), ("image", "image")):
        torch.manual_seed(0)
        video = VideoUNet.from_unet2d(UNet2DConditionModel(**size.unet()))
        if kind is not None:
            build_part(video, kind, kind, {"embed_dims": encoder.width} if kind == "image" else {})
        models[name] = video.freeze_base().to(device)
    return models


def run(size: Size, device: torch.device | None = None, *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Training step time of the plain, FPS-conditioned and image-conditioned video model."""
    from benchmarks.harness import video_inputs
    from lvdm.models.encoders import encode_image

    device = device or torch.device("cpu")
    encoder = _encoder(size, device)
    models = _models(size, device, encoder)
    text_dim = models["text to video"].unet.config.cross_attention_dim
    inputs = video_inputs(size, text_dim, device)
    b = inputs["x"].shape[0]
    s = encoder.model.config.image_size
    frames = torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(1)).to(device)  # normalised pixels
    rates = torch.full((b,), 8.0, device=device)
    extras = {
        "text to video": dict,
        "fps": lambda: {"fps": rates},
        "image": lambda: {"image_embeds": encode_image(encoder, frames)},  # the encoder runs every step
    }
    steps = {name: temporal_step(models[name], inputs, extras[name]) for name in models}
    timing = time_round_robin(steps, warmup=warmup, repeats=repeats, device=device)
    plain = timing["text to video"].median
    rows = [
        {"model": name, "median s": t.median, "spread": t.spread, "vs text to video": t.median / plain}
        for name, t in timing.items()
    ]
    added = {name: sum(p.numel() for p in model.parts.parameters()) for name, model in models.items()}
    encoder_params = sum(p.numel() for p in encoder.model.parameters())
    return {
        "timing": {name: t.to_dict() for name, t in timing.items()},
        "notes": [
            f"batch {b} x {inputs['x'].shape[2]} frames; image: {encoder_params:,}-parameter CLIP vision encoder "
            f"({s} px) on one frame per clip each step, {added['image']:,} trained parameters in the projection "
            f"and image attention; fps: {added['fps']:,} trained parameters",
        ],
        "tables": [{"title": "Training step with image / FPS conditioning", "rows": rows}],
        "targets": [
            target("image-to-video step / text-to-video step", timing["image"].median / plain, 1.15),
            target("fps-conditioned step / text-to-video step", timing["fps"].median / plain, 1.05),
        ],
    }
