"""The demo's base model: a tiny SD-shaped VAE and image UNet *trained* on the demo's own frames, so it can draw.

The tests' :func:`~lvdm.testing.make_tiny_sd` has random weights: it has SD's structure but draws static. The demo
needs a base that draws its shapes on their backgrounds before temporal layers can learn how they move, as a real
Stable Diffusion does. :func:`make_demo_base` trains, in a few minutes on 2 CPU cores:

1. a 3-level AutoencoderKL (downsampling by 4: 32x32 px frames <-> 8x8x4 latents) to reconstruct the frames
   (L1 + 4 x MSE + 1e-6 x KL), then sets its ``scaling_factor`` so the latents have unit variance;
2. the tiny SD1 UNet (:func:`~lvdm.testing.tiny_unet`, 8x8 latents) to denoise those latents (epsilon, SD's
   schedule), conditioned on the frame's caption through the frozen tiny CLIP text encoder (10 % captions dropped,
   for classifier-free guidance).

Every frame of every training clip counts as an image: the base never sees the order of frames. The folder it
writes is a normal diffusers folder plus ``demo_base.json`` (the recipe's key): :func:`demo_base_is_current` tells
whether a cached folder was built by the same recipe from the same clips.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from lvdm.diffusion.loss import prediction_target
from lvdm.testing.demo_folder import check_replaceable, folder_is_current, write_demo_folder
from lvdm.testing.models import seeded, tiny_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_unet

RECIPE_FILE = "demo_base.json"


@dataclass(frozen=True)
class DemoBaseRecipe:
    """How the demo base is trained; any change (or other clips) makes a cached base stale."""

    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: downsampling by 4
    vae_steps: int = 600
    vae_batch: int = 16
    vae_lr: float = 3e-3
    unet_steps: int = 1000
    unet_batch: int = 32
    unet_lr: float = 1.5e-3
    caption_dropout: float = 0.1
    prediction: str = "v_prediction"  # the UNet's target; epsilon leaves it poor at high noise (see train_unet)
    seed: int = 0
    version: int = 2  # bump when the training code changes what it produces


def demo_vae(channels: Sequence[int] = (16, 32, 32), seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL with ``len(channels)`` levels (downsampling by ``2 ** (levels - 1)``), 4 latent channels."""
    levels = len(channels)
    kwargs = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )  # fmt: skip
    return seeded(lambda: AutoencoderKL(**kwargs), seed)


def read_frame_bank(clips: Sequence[tuple[Path, str]], resolution: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """Every frame of each ``(clip, caption)`` as the demo's data pipeline sees them (decoded to cover
    ``resolution``, centre crop): ``((n, 3, h, w)`` in [-1, 1], one caption per frame)."""
    import random

    from lvdm.data.readers import probe, read_frames
    from lvdm.data.transforms import cover_size, to_clip_tensor

    height, width = resolution
    frames, captions = [], []
    for path, caption in clips:
        info = probe(path)
        decoded = read_frames(path, range(info.num_frames), size=cover_size(info.width, info.height, height, width))
        frames.append(to_clip_tensor(decoded, height, width, crop="center", flip=False, rng=random.Random(0)))
        captions += [caption] * len(decoded)
    return torch.cat(frames), captions


def recipe_key(recipe: DemoBaseRecipe, clips: Sequence[tuple[Path, str]], resolution: tuple[int, int]) -> str:
    """A hash of the recipe, the resolution and the clips' contents and captions."""
    digest = hashlib.sha256(json.dumps([asdict(recipe), list(resolution)], sort_keys=True).encode())
    for path, caption in clips:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest() + caption.encode())
    return digest.hexdigest()


def demo_base_is_current(path: str | os.PathLike, key: str) -> bool:
    """True when ``path`` holds a complete demo base built with ``key``."""
    return folder_is_current(path, RECIPE_FILE, key)


def batches(n: int, size: int, steps: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Generator]]:
    """``steps`` batches of ``size`` indices drawn from ``range(n)``, each with the generator (seeded once from
    ``seed``) that drew it, for the step's own noise."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (size,), generator=generator), generator


def fitter(params: Iterable[torch.nn.Parameter], lr: float, steps: int) -> Callable[[torch.Tensor], None]:
    """``fit(loss)``: one AdamW step on ``loss`` along a one-cycle LR schedule of ``steps`` steps."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)

    def fit(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    return fit


def train_vae(vae: AutoencoderKL, frames: torch.Tensor, recipe: DemoBaseRecipe, report: Callable) -> float:
    """Fit ``vae`` to reconstruct ``frames``, set ``scaling_factor``; returns the mean reconstruction error (0-255)."""
    vae.train()
    fit = fitter(vae.parameters(), recipe.vae_lr, recipe.vae_steps)
    for step, (index, generator) in enumerate(batches(len(frames), recipe.vae_batch, recipe.vae_steps, recipe.seed)):
        x = frames[index]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = (recon - x).abs().mean() + 4 * (recon - x).square().mean() + 1e-6 * posterior.kl().mean()
        fit(loss)
        report("vae", step, recipe.vae_steps, float(loss.detach()))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in frames.split(64)])
        recon = torch.cat([vae.decode(chunk).sample for chunk in means.split(64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return float((recon.clamp(-1, 1) - frames).abs().mean() * 127.5)


def train_unet(unet, vae, frames: torch.Tensor, text: torch.Tensor, empty: torch.Tensor, recipe: DemoBaseRecipe,
               report: Callable) -> float:  # fmt: skip
    """Fit ``unet`` to denoise the frames' latents given their caption embeddings ``text`` ``(n, k, d)``.

    The target is ``recipe.prediction``: v (as SD 2.x) by default. With epsilon, a short fit all but ignores the
    highest noise levels (their loss is tiny whatever the prediction of the clean image), and the base drew worse
    than predicting the mean latent there (loss 0.026 at t=950 against 0.008): every sampled frame then started
    from its own guess of what to draw, which no temporal layer trained on top could reconcile."""
    scheduler = DDPMScheduler.from_config(tiny_scheduler("sd1").config, prediction_type=recipe.prediction)
    with torch.no_grad():
        posteriors = [vae.encode(chunk).latent_dist for chunk in frames.split(64)]
        mean = torch.cat([p.mean for p in posteriors])
        std = torch.cat([p.std for p in posteriors])
    scale = vae.config.scaling_factor
    unet.train()
    fit = fitter(unet.parameters(), recipe.unet_lr, recipe.unet_steps)
    seed = recipe.seed + 1
    loss = torch.tensor(0.0)
    for step, (index, generator) in enumerate(batches(len(frames), recipe.unet_batch, recipe.unet_steps, seed)):
        b = len(index)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scale
        drop = torch.rand(b, generator=generator) < recipe.caption_dropout
        # b -> b 1 1: the empty caption where dropped
        cond = torch.where(drop[:, None, None], empty.expand_as(text[index]), text[index])
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
        pred = unet(scheduler.add_noise(latents, noise, t), t, cond).sample
        loss = (pred - prediction_target(scheduler, latents, noise, t)).square().mean()
        fit(loss)
        report("unet", step, recipe.unet_steps, float(loss.detach()))
    unet.eval().requires_grad_(False)
    return float(loss.detach())


def make_demo_base(
    path: str | os.PathLike,
    clips: Sequence[tuple[Path, str]],
    resolution: tuple[int, int] = (32, 32),
    recipe: DemoBaseRecipe = DemoBaseRecipe(),
    *,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Train the demo base on every frame of ``clips`` (``(path, caption)`` pairs) and write it to ``path``.

    Returns what it measured: seconds per stage, the VAE's reconstruction error, the UNet's last loss.
    """
    from lvdm.models.encoders import encode_text

    torch.manual_seed(recipe.seed)
    path = Path(path)
    check_replaceable(path, RECIPE_FILE, "demo base")  # before minutes of training
    key = recipe_key(recipe, clips, resolution)
    started = time.perf_counter()
    frames, captions = read_frame_bank(clips, resolution)
    tokenizer, text_encoder = tiny_tokenizer(), tiny_text_encoder("sd1", recipe.seed)
    unique = sorted(set(captions))
    with torch.no_grad():
        embeddings = encode_text(tokenizer, text_encoder, [*unique, ""])
    text = embeddings[torch.tensor([unique.index(c) for c in captions])]
    stats: dict[str, Any] = {"frames": len(frames), "read_seconds": time.perf_counter() - started}
    report = progress_reporter(log)
    vae = demo_vae(recipe.vae_channels, recipe.seed)
    started = time.perf_counter()
    stats["vae_error_255"] = train_vae(vae, frames, recipe, report)
    stats["vae_seconds"] = time.perf_counter() - started
    unet = tiny_unet("sd1", recipe.seed)
    started = time.perf_counter()
    stats["unet_loss"] = train_unet(unet, vae, frames, text, embeddings[-1:], recipe, report)
    stats["unet_seconds"] = time.perf_counter() - started
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(tiny_scheduler("sd1").config, prediction_type=recipe.prediction),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    record = {"key": key, "recipe": asdict(recipe), "resolution": list(resolution), "stats": stats}
    write_demo_folder(pipe, path, RECIPE_FILE, json.dumps(record, indent=2) + "\n", "demo base")
    return stats


def progress_reporter(log: Callable[[str], Any], every: int = 100) -> Callable[[str, int, int, float], None]:
    """``report(stage, step, total, loss)``: logs each stage's smoothed loss every ``every`` steps and at its last."""
    smoothed: dict[str, float] = {}

    def report(stage: str, step: int, total: int, loss: float) -> None:
        smoothed[stage] = loss if stage not in smoothed else 0.95 * smoothed[stage] + 0.05 * loss
        if (step + 1) % every == 0 or step + 1 == total:
            log(f"demo base: {stage} step {step + 1}/{total}, loss {smoothed[stage]:.4f}")

    return report


def shape_mask(frame: np.ndarray) -> np.ndarray:
    """``(h, w)`` bool: pixels that are not the demo's grey background (saturated colour, or bright)."""
    rgb = frame.astype(np.int16)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    return (saturation > 60) | (rgb.mean(axis=2) > 150)


def _largest_component(mask: np.ndarray) -> int:
    """Pixel count of the largest 4-connected component of ``mask``."""
    seen, best = np.zeros_like(mask), 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, size = [(y0, x0)], 0
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        best = max(best, size)
    return best


def shape_measure(frame: np.ndarray) -> dict[str, float]:
    """How a uint8 ``(h, w, 3)`` frame reads as "one shape on the grey background":

    ``area``: share of non-background pixels (:func:`shape_mask`); ``blob``: share of those in the largest
    connected region; ``background_saturation``: mean colour saturation (0-255) of the rest.
    """
    mask = shape_mask(frame)
    rgb = frame.astype(np.int16)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    count = int(mask.sum())
    rest = saturation[~mask]
    return {
        "area": count / mask.size,
        "blob": _largest_component(mask) / count if count else 0.0,
        "background_saturation": float(rest.mean()) if rest.size else 255.0,
    }


def shows_a_shape(frame: np.ndarray, *, min_area: float = 0.02, max_area: float = 0.45) -> bool:
    """True when ``frame`` shows one shape on a grey background: 2-45 % of the pixels are coloured or bright (the
    demo's shapes cover 8-17 %; the tiny base draws them blurred and larger), at least 70 % of those in one
    connected region, and the rest greyish (mean saturation < 35; the base leaves a tinted haze). Static noise
    (about 90 % coloured), a blank frame, two shapes and a coloured background all fail."""
    m = shape_measure(frame)
    return min_area <= m["area"] <= max_area and m["blob"] >= 0.7 and m["background_saturation"] < 35
