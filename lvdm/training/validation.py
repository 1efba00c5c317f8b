"""What a run reports about itself: the temporal gain on held-out clips, and sample videos.

The temporal gain is the held-out denoising loss with the temporal layers bypassed (image-only
mode: the frozen image model) divided by the loss with them on, at fixed timesteps and fixed
noise. Above 1 the temporal layers use the other frames to denoise better than the image model
can: motion is being learned. At initialisation it is exactly 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lvdm.diffusion import diffusion_loss, guidance_schedule, make_scheduler, sample
from lvdm.media import to_uint8_frames, write_gif, write_video
from lvdm.models.encoders import decode_latents, encode_text
from lvdm.training.step import Frozen, batch_latents_and_text, step_generator

GAIN_TIMESTEPS = (50, 200, 400, 600, 800, 950)


@torch.no_grad()
def temporal_gain(
    model_fn: Any, batches: list[dict[str, Any]], frozen: Frozen, device: torch.device
) -> dict[str, float]:
    """``loss_video``, ``loss_image`` and their ratio ``temporal_gain`` over ``batches`` at fixed t and noise."""
    totals, terms_count = {"video": 0.0, "image": 0.0}, 0
    for number, batch in enumerate(batches):
        generator = step_generator(-1, 0, number)  # the same draws at every validation
        latents, text = batch_latents_and_text(batch, frozen, generator, device)
        b = latents.shape[0]
        for t in GAIN_TIMESTEPS:
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.full((b,), t, dtype=torch.long, device=device)
            for mode, flag in (("video", 0.0), ("image", 1.0)):
                terms = diffusion_loss(
                    model_fn, latents, frozen.noise_scheduler, noise=noise, timesteps=timesteps,
                    encoder_hidden_states=text, image_only_indicator=torch.full((b,), flag, device=device),
                )  # fmt: skip
                totals[mode] += float(terms.loss.mean())
            terms_count += 1
    count = max(terms_count, 1)
    return {
        "loss_video": totals["video"] / count,
        "loss_image": totals["image"] / count,
        "temporal_gain": totals["image"] / max(totals["video"], 1e-12),
    }


@torch.no_grad()
def sample_videos(
    model_fn: Any,
    frozen: Frozen,
    prompts: list[str],
    out_dir: Path,
    *,
    num_frames: int,
    latent_size: tuple[int, int],
    latent_channels: int,
    steps: int = 25,
    guidance_scale: float = 7.5,
    fps: float = 8.0,
    seed: int = 0,
    device: torch.device | None = None,
) -> list[Path]:
    """Render each prompt (DDIM, classifier-free guidance) to ``out_dir/<i>.mp4`` and ``.gif``."""
    scheduler = make_scheduler("ddim", frozen.noise_scheduler.config)
    empty = frozen.empty_text.to(device)
    written = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        shape = (1, latent_channels, num_frames, *latent_size)
        noise = torch.randn(shape, generator=generator).to(device)
        text = encode_text(frozen.tokenizer, frozen.text_encoder, [prompt]).to(device, torch.float32)
        latents = sample(
            model_fn, scheduler, latents=noise, num_inference_steps=steps,
            cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty.float()},
            guidance=guidance_schedule("constant", guidance_scale), generator=generator, progress=False,
        )  # fmt: skip
        frames = to_uint8_frames(decode_latents(frozen.vae, latents)[0].float().cpu())
        out_dir.mkdir(parents=True, exist_ok=True)
        written += [
            write_video(frames, out_dir / f"{i:02d}.mp4", fps=fps),
            write_gif(frames, out_dir / f"{i:02d}.gif", fps=fps),
        ]
    return written
