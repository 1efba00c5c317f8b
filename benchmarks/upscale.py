"""What the x4 video upscaler costs: sampling memory whole vs in tiles, and a patch training step per pixel.

``python -m benchmarks --only upscale`` (any device):

- **memory** (fake tensors, as :mod:`benchmarks.memory`; no GPU needed): one denoising step of SD's x4 upscaler
  (its real architecture, random weights, fp16) with the videoldm temporal layers, on a 16-frame 256x256 video
  (1024x1024 out) with text guidance (a batch of 2), whole and in 128 px tiles sharing 32
  (:func:`lvdm.tiles.tiled`, with the reference run for the frame's GroupNorm statistics, as the pipeline runs it);
  and the x4 VAE decoding one frame whole and in 64-latent tiles sharing 16;
- **patch step per pixel**: a training step of the same model shape (a quarter of its width but at ``--size sd15``)
  on ``--size``'s frames and latent size vs on patches a quarter of their area (the batch four times larger, so
  both see the same pixels), seconds per high-res pixel, interleaved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.harness import Size, make_optimizer, time_round_robin
from benchmarks.memory import GIB, PeakTracker, _fake_parameters
from benchmarks.report import target

X4_UNET = dict(
    sample_size=128, in_channels=7, out_channels=4, layers_per_block=2, block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=8, use_linear_projection=True,
    only_cross_attention=(True, True, True, False), num_class_embeds=1000, class_embed_type=None,
)  # fmt: skip
"""``stabilityai/stable-diffusion-x4-upscaler``'s UNet configuration."""

X4_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333,
)  # fmt: skip
"""... and its VAE's (downsampling by 4)."""


def _fake_peak(build: Any, call: Any) -> float:
    """Peak GiB of ``call(model)`` without autograd, the model ``build()`` made on meta, fp16 fake weights."""
    with torch.device("meta"):
        model = build()
    model.eval().requires_grad_(False)
    tracker = PeakTracker()
    with FakeTensorMode():
        _fake_parameters(model, torch.float16)
        for tensor in [*model.parameters(), *model.buffers()]:
            tracker.track(tensor)
        with tracker, torch.no_grad():
            call(model)
    return tracker.peak / GIB


def _video_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    from lvdm.models import VideoUNet

    return VideoUNet.from_unet2d(UNet2DConditionModel(**X4_UNET))


def _vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**X4_VAE)


def sampling_memory(frames: int = 16, size: int = 256, tile: int = 128, overlap: int = 32) -> dict[str, float]:
    """Peak GiB of one guided denoising step and of one frame's decode, whole and tiled."""
    from lvdm.tile_decode import decode_latents_tiled
    from lvdm.tiles import tiled

    def step(window: int | None):
        def call(model: nn.Module) -> None:
            def fn(x, t, text, low_res, labels):
                return model(torch.cat([x, low_res], dim=1), t, text, class_labels=labels)

            x = torch.empty(2, 4, frames, size, size, dtype=torch.float16)
            low = torch.empty(2, 3, frames, size, size, dtype=torch.float16)
            t, labels = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
            text = torch.empty(2, 77, 1024, dtype=torch.float16)
            windows = (None, window, window)
            run = fn if window is None else tiled(fn, windows, (0, overlap, overlap), norms=model, multiple=8)
            run(x, t, text, low_res=low, labels=labels)

        return call

    def decode(window: int | None):
        def call(vae: nn.Module) -> None:
            z = torch.empty(1, 4, 1, size, size, dtype=torch.float16)

            if window is None:
                vae.decode(z[:, :, 0])
            else:  # as UpscalePipeline.decode runs it: the middle block whole, the up blocks in tiles
                decode_latents_tiled(vae, z, window, 16)

        return call

    return {
        "unet whole": _fake_peak(_video_unet, step(None)),
        "unet tiled": _fake_peak(_video_unet, step(tile)),
        "vae whole": _fake_peak(_vae, decode(None)),
        "vae tiled": _fake_peak(_vae, decode(64)),
    }


def _step(model: Any, optimizer: Any, batch: int, frames: int, latent: int, text_dim: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 7, frames, latent, latent, generator=g)
    target_ = torch.randn(batch, 4, frames, latent, latent, generator=g)
    t, labels = torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, 350, (batch,), generator=g)
    text = torch.randn(batch, 77, text_dim, generator=g)

    def step() -> None:
        loss = nn.functional.mse_loss(model(x, t, text, class_labels=labels), target_)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(size: Size, device: torch.device | None = None, *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    from lvdm.models import VideoUNet

    memory = sampling_memory()
    shrink = 1 if size.name == "sd15" else 4  # the x4 shape at a quarter width off a GPU
    config = dict(X4_UNET, block_out_channels=tuple(c // shrink for c in X4_UNET["block_out_channels"]),
                  cross_attention_dim=size.unet()["cross_attention_dim"])  # fmt: skip
    width = config["block_out_channels"][0]
    torch.manual_seed(0)
    model = VideoUNet.from_unet2d(UNet2DConditionModel(**config)).freeze_base()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    full, frames = size.latent, size.frames  # latents as large as the low-res frames, 4x smaller than the output
    steps = {
        "full frame": _step(model, optimizer, size.batch, frames, full, config["cross_attention_dim"]),
        "patches": _step(model, optimizer, 4 * size.batch, frames, full // 2, config["cross_attention_dim"]),
    }
    timing = time_round_robin(steps, warmup=warmup, repeats=repeats, device=torch.device("cpu"))
    pixels = size.batch * frames * (4 * full) ** 2  # high-res pixels per step, the same in both
    per_pixel = {name: t.median / pixels for name, t in timing.items()}
    ratio = per_pixel["patches"] / per_pixel["full frame"]
    rows = [{"what": name, "GiB": value} for name, value in memory.items()]
    step_rows = [{"step": name, "median s": t.median, "spread": t.spread, "us / high-res pixel": per_pixel[name] * 1e6}
                 for name, t in timing.items()]  # fmt: skip
    return {
        "timing": {name: t.to_dict() for name, t in timing.items()},
        "memory_gib": memory,
        "notes": [
            "memory: SD x4 upscaler (real architecture, fp16 fake weights) + videoldm temporal layers; one guided "
            "step (batch 2) on 16 frames of 256x256 low-res (1024x1024 out), whole vs 128 px tiles sharing 32; "
            "the x4 VAE decoding one 256x256-latent frame whole vs 64-latent tiles sharing 16",
            f"patch step: x4-upscaler-shaped UNet at width {width}, {frames} frames, full frames of {full}x{full} "
            f"latents (batch {size.batch}) vs {full // 2}x{full // 2} patches (batch {4 * size.batch}), CPU",
        ],
        "tables": [
            {"title": "Upscaler sampling memory (fake tensors)", "rows": rows},
            {"title": "Training step per high-res pixel: patches vs full frames", "rows": step_rows},
        ],
        "targets": [
            target("tiled UNet step peak / whole", memory["unet tiled"] / memory["unet whole"], 1.0),
            target("tiled VAE decode peak / whole", memory["vae tiled"] / memory["vae whole"], 1.0),
            target("patch step time per pixel / full-frame step's", ratio, 1.10),
        ],
    }
