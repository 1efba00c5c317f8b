"""Tiled vs whole x4 upscale on an upscaler that works at its tile's size (README, "Tiles"): about 40 minutes on 2
CPU cores, every step skipped where its output is already there.

    python -m benchmarks.tiles_experiment --root tiles-experiment

1. the demo base (VAE and text encoder; ``configs/demo.yaml``'s, made as the demo makes it) and 12 captioned
   256 px clips;
2. an x4 upscaler's image UNet (:func:`lvdm.testing.tiny_upscaler_unet`) trained on random 128 px crops of 10 of
   them (32-latent, 32 px low-res), the demo upscaler's recipe otherwise;
3. its temporal layers, ``train.py --config configs/demo_upscale.yaml`` on 128 px patches;
4. the 2 clips left out, 64 px low-res, upscaled whole and in 32 px tiles sharing 8, as a video and frame by frame,
   seeds 0 and 1: mean |difference| per 255 from the whole upscale, all pixels and away from the shared stretches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CROP, STEPS, BATCH, LR = 32, 1500, 4, 1.5e-3  # latents of the image UNet's crops; its steps, batch, learning rate
SAMPLE_STEPS = 20


def make_data(root: Path) -> None:
    from lvdm import load_config
    from lvdm.testing.clips import write_captioned_folder
    from lvdm.training.demo import prepare_demo

    cwd = os.getcwd()
    os.chdir(root)  # the demo config's paths are relative: outputs/demo/{base,clips}
    try:
        prepare_demo(load_config(str(REPO / "configs/demo.yaml")))
    finally:
        os.chdir(cwd)
    clips = root / "clips256"
    if not any(clips.rglob("*.mp4")):
        write_captioned_folder(clips, 12, num_frames=24, fps=24.0, size=(256, 256), seed=100)
    train = root / "clips256_train"
    if not train.exists():
        train.mkdir()
        for clip in all_clips(root)[:10]:
            for suffix in (".mp4", ".txt"):
                shutil.copy(clip.with_suffix(suffix), train / clip.with_suffix(suffix).name)


def all_clips(root: Path) -> list[Path]:
    return sorted((root / "clips256").rglob("*.mp4"))


def train_image_unet(root: Path) -> None:
    from diffusers import StableDiffusionUpscalePipeline

    from lvdm.diffusion.loss import prediction_target
    from lvdm.models import load_base
    from lvdm.models.encoders import encode_text
    from lvdm.testing.demo_base import fitter, read_frame_bank
    from lvdm.testing.demo_upscaler import rescale_latent_space, write_demo_upscaler
    from lvdm.testing.models import tiny_upscaler_unet
    from lvdm.testing.upscaler import upscaler_schedulers
    from lvdm.training.upscale import downsample

    torch.manual_seed(0)
    model = load_base(root / "outputs/demo/base")
    rescale_latent_space(model.vae)
    clips = [(path, path.with_suffix(".txt").read_text(encoding="utf-8").strip()) for path in all_clips(root)[:10]]
    frames, captions = read_frame_bank(clips, (256, 256))
    unique = sorted(set(captions))
    with torch.no_grad():
        embeddings = encode_text(model.tokenizer, model.text_encoder, [*unique, ""])
        text = embeddings[torch.tensor([unique.index(c) for c in captions])]
        posteriors = [model.vae.encode(chunk).latent_dist for chunk in frames.split(8)]
        mean, std = torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])
        low = downsample(frames[:, None], 4)[:, 0]
    scheduler, low_res = upscaler_schedulers()
    unet = tiny_upscaler_unet(0).train()
    fit, g = fitter(unet.parameters(), LR, STEPS), torch.Generator().manual_seed(2)
    side = mean.shape[-1]
    for step in range(STEPS):
        index = torch.randint(0, len(mean), (BATCH,), generator=g).tolist()
        corners = list(zip(index, *(torch.randint(0, side - CROP + 1, (BATCH,), generator=g).tolist()
                                    for _ in range(2)), strict=True))  # fmt: skip
        m, s, lo = (
            torch.stack([x[i, :, a : a + CROP, b : b + CROP] for i, a, b in corners]) for x in (mean, std, low)
        )
        latents = (m + s * torch.randn(m.shape, generator=g)) * model.vae.config.scaling_factor
        levels = torch.randint(0, 351, (BATCH,), generator=g)
        noisy_low = low_res.add_noise(lo, torch.randn(lo.shape, generator=g), levels)
        drop = torch.rand(BATCH, generator=g) < 0.1
        cond = torch.where(drop[:, None, None], embeddings[-1:].expand_as(text[index]), text[index])
        noise, t = torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (BATCH,), generator=g)
        x = torch.cat([scheduler.add_noise(latents, noise, t), noisy_low], 1)
        target = prediction_target(scheduler, latents, noise, t)
        loss = (unet(x, t, cond, class_labels=levels).sample - target).square().mean()
        fit(loss)
        if step % 500 == 0 or step == STEPS - 1:
            print(f"image UNet step {step}/{STEPS}: loss {loss.item():.4f}", flush=True)
    unet.eval().requires_grad_(False)
    pipe = StableDiffusionUpscalePipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                          unet=unet, scheduler=scheduler, low_res_scheduler=low_res,
                                          max_noise_level=350)  # fmt: skip
    write_demo_upscaler(pipe, root / "upscaler256", {"key": "tiles-experiment", "steps": STEPS})


def train_temporal(root: Path) -> None:
    settings = [f"model.base={root / 'upscaler256'}", f"data.root={root / 'clips256_train'}",
                "data.resolution=[256,256]", "train.upscale_patch=128", "train.batch_size=1", "train.max_steps=300",
                "train.validate_every=300", "train.checkpoint_every=300",
                f"output_dir={root / 'upscale256'}"]  # fmt: skip
    config = str(REPO / "configs/demo_upscale.yaml")
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config", config, *settings], check=True)


def measure(root: Path, temporal: Path | None) -> list[dict]:
    from lvdm import UpscalePipeline
    from lvdm.data.readers import read_frames
    from lvdm.tiles import spans
    from lvdm.training.upscale import downsample

    pipe = UpscalePipeline.from_pretrained(root / "upscaler256", temporal=temporal)
    cover = np.zeros(64)
    for begin, end in spans(64, 32, 8):
        cover[begin:end] += 1
    alone = np.repeat(cover == 1, 4)  # output pixels of low-res positions in one tile only, per axis
    away = alone[:, None] & alone[None, :]
    variants = {"reference": {}, "pooled": {"frame_norms": "pooled"},
                "pooled x4": {"frame_norms": "pooled", "norm_passes": 4}, "own": {"frame_norms": False}}  # fmt: skip
    rows = []
    for path in all_clips(root)[10:]:
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        high = np.stack(read_frames(path, range(0, 16, 2), size=(256, 256)))
        x = torch.from_numpy(high).permute(0, 3, 1, 2).float() / 127.5 - 1
        low = ((downsample(x[None], 4)[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        wholes = {}
        for seed in (0, 1):
            kw = {"num_inference_steps": SAMPLE_STEPS, "guidance_scale": 1.0, "progress": False, "seed": seed}
            wholes[seed] = pipe(low, caption, **kw).frames[0].astype(float)
            row = {"clip": path.name, "seed": seed}
            for name, extra in variants.items():
                tiled = pipe(low, caption, tile=32, tile_overlap=8, **extra, **kw).frames[0].astype(float)
                row[name] = _difference(tiled, wholes[seed], away)
            row["whole vs original"] = _difference(wholes[seed], high.astype(float), away)
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(json.dumps({"clip": path.name, "two seeds": _difference(wholes[0], wholes[1], away)}), flush=True)
    return rows


def _difference(a: np.ndarray, b: np.ndarray, away: np.ndarray) -> list[float]:
    diff = np.abs(a - b)  # f H W 3
    return [round(float(diff.mean()), 2), round(float(diff[:, away].mean()), 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("tiles-experiment"), help="where everything is made")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    make_data(root)
    if not (root / "upscaler256/model_index.json").exists():
        train_image_unet(root)
    temporal = root / "upscale256/temporal.safetensors"
    if not temporal.exists():
        train_temporal(root)
    for mode, module in (("frame by frame", None), ("as a video", temporal)):
        print(f"--- {mode}", flush=True)
        measure(root, module)


if __name__ == "__main__":
    main()
