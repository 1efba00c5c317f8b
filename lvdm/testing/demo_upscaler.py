"""The demo's x4 upscaler: the x4 upscaler's UNet shape *trained* on the demo's frames, so it can upscale them.

As with the demo base (:mod:`lvdm.testing.demo_base`), a random model would only upscale into static; the temporal
upscaler stage needs an image upscaler that works, as SD's does. :func:`make_demo_upscaler` reuses the demo base's
VAE (it downsamples by 4, as the x4 upscaler's does: 32x32 px frames <-> 8x8 latents) and text encoder, and trains
:func:`~lvdm.testing.tiny_upscaler_unet` to denoise a frame's latents given the frame downsampled by 4 (8x8 px,
bicubic with antialiasing, :func:`lvdm.training.upscale.downsample`) noise-augmented to a level drawn from
``0 .. max_noise_level`` by the low-res DDPM schedule, the level as class label, and its caption (10 % dropped):
the x4 upscaler's recipe. The VAE's latents are rescaled for the x4 upscaler's scaling factor
(:func:`rescale_latent_space`). The folder is a diffusers ``StableDiffusionUpscalePipeline`` plus
``demo_upscaler.json`` (the recipe's key, which includes the base's).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lvdm.models.family import downsampling

RECIPE_FILE = "demo_upscaler.json"


@dataclass(frozen=True)
class DemoUpscalerRecipe:
    """How the demo upscaler is trained; any change (or another base) makes a cached one stale."""

    steps: int = 1000
    batch: int = 32
    lr: float = 1.5e-3
    caption_dropout: float = 0.1
    max_noise_level: int = 350
    seed: int = 0
    version: int = 2  # 2: the VAE's latents rescaled for the x4 scaling factor


def upscaler_key(recipe: DemoUpscalerRecipe, base: str | os.PathLike) -> str:
    """A hash of the recipe and the demo base's own key (its recipe and clips)."""
    from lvdm.testing.demo_base import RECIPE_FILE as BASE_FILE

    base_key = json.loads((Path(base) / BASE_FILE).read_text(encoding="utf-8"))["key"]
    return hashlib.sha256(json.dumps([asdict(recipe), base_key], sort_keys=True).encode()).hexdigest()


def demo_upscaler_is_current(path: str | os.PathLike, key: str) -> bool:
    """True when ``path`` holds a complete demo upscaler built with ``key``."""
    from lvdm.testing.demo_folder import folder_is_current

    return folder_is_current(path, RECIPE_FILE, key)


X4_SCALING = 0.08333  # what diffusers' StableDiffusionUpscalePipeline sets on any VAE it is given


@torch.no_grad()
def rescale_latent_space(vae: Any, scaling_factor: float = X4_SCALING) -> None:
    """Make ``scaling_factor`` right for ``vae`` without changing what it encodes and decodes: its latents become
    ``k = vae.config.scaling_factor / scaling_factor`` times larger (the encoder's mean rows and log-variance
    biases scaled, the decoder's first conv divided by ``k``), so ``latents * scaling_factor`` is what it was.

    Needed because ``StableDiffusionUpscalePipeline`` replaces any VAE's scaling factor by the x4 upscaler's 0.08333
    (diffusers warns "wrong scaling_factor"): the demo base's VAE (scaling 0.66) would otherwise give the upscaler
    latents 8x smaller than the UNet was trained on."""
    import math

    k = vae.config.scaling_factor / scaling_factor
    c = vae.config.latent_channels
    quant = vae.quant_conv  # 2c outputs: mean, then log-variance
    quant.weight[:c] *= k
    quant.bias[:c] *= k
    quant.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=scaling_factor)


def train_upscaler_unet(unet, vae, low_res_scheduler, frames, text, empty, recipe, report: Callable) -> float:
    """Fit ``unet`` to denoise the latents of ``frames`` ``(n, 3, H, W)`` given their noisy 4x-downsampled version
    and caption embeddings ``text`` ``(n, k, d)``; returns the last loss."""
    from lvdm.diffusion.loss import prediction_target
    from lvdm.testing.demo_base import batches, fitter
    from lvdm.testing.upscaler import upscaler_schedulers
    from lvdm.training.upscale import downsample

    scheduler = upscaler_schedulers()[0]
    factor = downsampling(vae.config.block_out_channels)
    with torch.no_grad():
        posteriors = [vae.encode(chunk).latent_dist for chunk in frames.split(64)]
        mean, std = torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])
        low = downsample(frames[:, None], factor)[:, 0]  # n 3 h w
    unet.train()
    fit = fitter(unet.parameters(), recipe.lr, recipe.steps)
    loss = torch.tensor(0.0)
    for step, (index, generator) in enumerate(batches(len(frames), recipe.batch, recipe.steps, recipe.seed + 2)):
        b = len(index)
        latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        latents = latents * vae.config.scaling_factor
        levels = torch.randint(0, recipe.max_noise_level + 1, (b,), generator=generator)
        noisy_low = low_res_scheduler.add_noise(low[index], torch.randn(low[index].shape, generator=generator), levels)
        drop = torch.rand(b, generator=generator) < recipe.caption_dropout
        cond = torch.where(drop[:, None, None], empty.expand_as(text[index]), text[index])  # b -> b 1 1
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
        x = torch.cat([scheduler.add_noise(latents, noise, t), noisy_low], dim=1)
        pred = unet(x, t, cond, class_labels=levels).sample
        loss = (pred - prediction_target(scheduler, latents, noise, t)).square().mean()
        fit(loss)
        report("upscaler", step, recipe.steps, float(loss.detach()))
    unet.eval().requires_grad_(False)
    return float(loss.detach())


def make_demo_upscaler(
    path: str | os.PathLike,
    base: str | os.PathLike,
    clips: Sequence[tuple[Path, str]],
    resolution: tuple[int, int] = (32, 32),
    recipe: DemoUpscalerRecipe = DemoUpscalerRecipe(),
    *,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Train the demo upscaler on every frame of ``clips`` with the demo ``base``'s VAE and text encoder, and write
    it to ``path`` (a folder lvdm made: replaced whole). Returns the seconds it took and the last loss."""
    from diffusers import StableDiffusionUpscalePipeline

    from lvdm.models import load_base
    from lvdm.models.encoders import encode_text
    from lvdm.testing.demo_base import progress_reporter, read_frame_bank
    from lvdm.testing.demo_folder import check_replaceable
    from lvdm.testing.models import tiny_upscaler_unet
    from lvdm.testing.upscaler import upscaler_schedulers

    check_replaceable(Path(path), RECIPE_FILE, "demo upscaler")  # before minutes of training
    torch.manual_seed(recipe.seed)
    key = upscaler_key(recipe, base)
    started = time.perf_counter()
    model = load_base(base)
    rescale_latent_space(model.vae)
    frames, captions = read_frame_bank(clips, resolution)
    unique = sorted(set(captions))
    with torch.no_grad():
        embeddings = encode_text(model.tokenizer, model.text_encoder, [*unique, ""])
    text = embeddings[torch.tensor([unique.index(c) for c in captions])]
    scheduler, low_res = upscaler_schedulers()
    unet = tiny_upscaler_unet(recipe.seed)
    report = progress_reporter(log)
    loss = train_upscaler_unet(unet, model.vae, low_res, frames, text, embeddings[-1:], recipe, report)
    pipe = StableDiffusionUpscalePipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=unet, scheduler=scheduler,
        low_res_scheduler=low_res, max_noise_level=recipe.max_noise_level,
    )  # fmt: skip
    stats = {"seconds": time.perf_counter() - started, "loss": loss, "frames": len(frames)}
    record = {"key": key, "recipe": asdict(recipe), "resolution": list(resolution), "stats": stats}
    write_demo_upscaler(pipe, Path(path), record)
    return stats


def write_demo_upscaler(pipe: Any, path: Path, record: dict[str, Any]) -> None:
    """Save ``pipe`` to ``path``, replacing a previous demo upscaler and nothing else."""
    from lvdm.testing.demo_folder import write_demo_folder

    write_demo_folder(pipe, path, RECIPE_FILE, json.dumps(record, indent=2) + "\n", "demo upscaler")
