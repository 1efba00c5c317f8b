"""Training target ``upscale``: the temporal layers of SD's x4 latent upscaler, on video patches (Video LDM sec. 3.4).

The base is an x4 upscaler (``model.base``: a ``StableDiffusionUpscalePipeline`` folder), frozen; its video UNet's
temporal layers train. Per clip of a micro-batch, drawn from the step's generator:

- a **patch** of ``train.upscale_patch`` high-res pixels, cut at the same place in every frame;
- its **low-res** version, made as users make theirs (and as :func:`downsample` documents): bicubic, antialiased,
  by the VAE's factor (4);
- **noise augmentation**: the low-res frames noised by the upscaler's own low-res schedule to a level drawn
  uniformly from ``0 .. train.upscale_max_noise_level`` (default the upscaler's, 350), the level the class label,
  as the upscaler was trained and as the paper's conditioning augmentation does;
- the diffusion loss on the patch's latents, the noisy low-res frames concatenated to the noisy latents, the
  caption kept (dropped as ``train.caption_dropout`` says).

Validation, on the held-out clips whole (not patches), at ``train.upscale_validation_noise_level``:

- the **temporal gain** (the motion gain of :func:`~lvdm.training.validation.motion_gains`: the low-res frames are
  shuffled with the latents), i.e. whether the temporal layers use the order of the frames;
- the held-out clips upscaled from their low-res version by the video model and frame by frame (image mode, the
  same weights, noise and steps): PSNR and the **flicker error** against the originals (mean |change between
  consecutive frames of the output - of the original|, 0-255), and the **flicker gain** (frame by frame / video).

Samples show each held-out clip's low-res input (enlarged), the video upscale and the original, side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from lvdm.errors import ConfigError
from lvdm.models.family import downsampling
from lvdm.training.objectives import Objective
from lvdm.training.step import Frozen, training_loss
from lvdm.upscale_pipeline import with_low_res

if TYPE_CHECKING:
    from lvdm.training.validation import Rendered


def downsample(video: torch.Tensor, factor: int) -> torch.Tensor:
    """``(b, f, 3, H, W)`` in [-1, 1] -> ``(b, f, 3, H/factor, W/factor)``: bicubic with antialiasing (what PIL's
    ``resize(..., BICUBIC)`` does), clamped to [-1, 1]."""
    b, f = video.shape[:2]
    frames = video.flatten(0, 1).float()
    small = F.interpolate(frames, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return small.clamp(-1, 1).reshape(b, f, *small.shape[1:])


def random_patch(video: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``size`` x ``size`` patch of each clip ``(b, f, 3, H, W)``, at one place (drawn) in all its frames."""
    h, w = video.shape[-2:]
    tops = torch.randint(0, h - size + 1, (video.shape[0],), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (video.shape[0],), generator=generator).tolist()
    return torch.stack([clip[..., t : t + size, x : x + size] for clip, t, x in zip(video, tops, lefts, strict=True)])


def check_upscaler_fit(train: Any, top: int, factor: int, unet_multiple: int) -> None:
    """``train.upscale_patch`` a multiple of the VAE's ``factor`` times the UNet's downsampling, and the noise levels
    at most the upscaler's ``top`` (``max_noise_level``)."""
    step = factor * unet_multiple
    if train.upscale_patch % step:
        raise ConfigError(
            f"train.upscale_patch: {train.upscale_patch} px must be a multiple of {step} (the VAE's factor "
            f"{factor} times the UNet's downsampling {unet_multiple})"
        )
    for key in ("upscale_max_noise_level", "upscale_validation_noise_level"):
        value = getattr(train, key)
        if value is not None and value > top:
            raise ConfigError(f"train.{key}: {value} is above the upscaler's max_noise_level {top}")


def check_upscaler_folder(cfg: Any) -> None:
    """:func:`check_upscaler_fit` from an upscaler folder's configs, before it loads (they were found after the
    upscaler had loaded). A base that is not such a folder, or whose configs do not read, is left to the loader."""
    from lvdm.errors import CheckpointError
    from lvdm.fileio import read_json
    from lvdm.models.loading import pipeline_class
    from lvdm.upscale_pipeline import UpscaleLimits

    folder = Path(cfg.model.base)
    if (
        cfg.train.target != "upscale"
        or not folder.is_dir()
        or pipeline_class(folder) != "StableDiffusionUpscalePipeline"
    ):
        return
    try:
        limits = UpscaleLimits.of_folder(folder)
        factor = downsampling(read_json(folder / "vae" / "config.json")["block_out_channels"])
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        return
    check_upscaler_fit(cfg.train, limits.max_noise_level, factor, limits.multiple)


class UpscaleObjective(Objective):
    """The diffusion loss of an x4 upscaler's video UNet on noise-augmented low-res patches (module notes)."""

    name = "upscale"

    def __init__(self, cfg: Any, video: Any, frozen: Frozen, device: torch.device) -> None:
        super().__init__(cfg, video, frozen, device)
        self.factor = downsampling(frozen.vae.config.block_out_channels)
        unet_multiple = downsampling(video.unet.config.block_out_channels)
        check_upscaler_fit(cfg.train, frozen.max_noise_level, self.factor, unet_multiple)
        top, chosen = frozen.max_noise_level, cfg.train.upscale_max_noise_level
        self.max_level = top if chosen is None else chosen
        self.samples: dict[str, torch.Tensor] = {}

    def low_res_inputs(
        self, video: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The model inputs of high-res clips ``(b, f, 3, H, W)``: their low-res frames noised to ``levels`` ``(b,)``
        (``low_res`` ``(b, 3, f, h, w)``) and the levels as ``class_labels``."""
        low = downsample(video, self.factor)
        noise = torch.randn(low.shape, generator=generator)
        noisy = self.frozen.low_res_scheduler.add_noise(low, noise, levels)  # b f 3 h w, a level per clip
        return {
            "low_res": noisy.permute(0, 2, 1, 3, 4).to(self.device),  # b f 3 h w -> b 3 f h w
            "class_labels": levels.to(self.device),
        }

    def loss(self, model_fn: Any, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        patch = random_patch(batch["video"], self.cfg.train.upscale_patch, generator)
        levels = torch.randint(0, self.max_level + 1, (patch.shape[0],), generator=generator)
        inputs = self.low_res_inputs(patch, levels, generator)
        batch = {**batch, "video": patch}
        return training_loss(
            with_low_res(model_fn), batch, self.frozen, self.cfg.train, generator, self.device, inputs=inputs
        ).loss

    # ------------------------------------------------------------------------------------------ validation
    def _held_out_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from lvdm.training.step import step_generator

        b = batch["video"].shape[0]
        levels = torch.full((b,), self.cfg.train.upscale_validation_noise_level, dtype=torch.long)
        return self.low_res_inputs(batch["video"], levels, step_generator(-4, 0, int(batch["index"][0])))

    def evaluate(self, model_fn: Any, batches: list[dict[str, Any]]) -> dict[str, float] | None:
        from lvdm.training.decoder import flicker_error, psnr
        from lvdm.training.validation import motion_gains

        batches = [batch for batch in batches if "video" in batch]
        if not batches:
            return None
        train = self.cfg.train
        prior = {"noise_prior": train.noise_prior, "mixed_lambda": train.mixed_noise_lambda}
        figures = motion_gains(with_low_res(model_fn), batches, self.frozen, self.device, inputs=self._held_out_inputs,
                               **prior)  # fmt: skip
        self.samples = self.upscaled(model_fn, batches)
        clips = self.samples["clips"]
        for mode in ("video", "image"):
            figures[f"psnr_upscaled_{mode}"] = psnr(self.samples[mode], clips)
            figures[f"flicker_upscaled_{mode}"] = flicker_error(self.samples[mode], clips)
        figures["upscale_flicker_gain"] = figures["flicker_upscaled_image"] / max(figures["flicker_upscaled_video"],
                                                                                  1e-12)  # fmt: skip
        return figures

    @torch.no_grad()
    def upscaled(self, model_fn: Any, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The held-out clips (``clips``), their low-res inputs enlarged (``low_res``) and their upscales by the
        video model (``video``) and frame by frame (``image``: the same weights in image mode, the same noise),
        ``(n, f, 3, H, W)`` in [-1, 1]."""
        from lvdm.diffusion import guidance_schedule, make_scheduler, sample
        from lvdm.models.encoders import decode_latents, encode_text
        from lvdm.training.step import step_generator

        train, out = self.cfg.train, {"clips": [], "low_res": [], "video": [], "image": []}
        fn = with_low_res(model_fn)
        for batch in batches:
            clips = batch["video"].float()
            inputs = self._held_out_inputs(batch)
            b, (f, h, w) = clips.shape[0], inputs["low_res"].shape[2:]
            text = encode_text(self.frozen.tokenizer, self.frozen.text_encoder, batch["caption"]).float()
            empty = self.frozen.empty_text.to(text).expand_as(text)
            generator = step_generator(-5, 0, int(batch["index"][0]))
            noise = torch.randn((b, self.frozen.vae.config.latent_channels, f, h, w), generator=generator)
            for mode, flag in (("video", 0.0), ("image", 1.0)):
                cond = {"encoder_hidden_states": text.to(self.device), **inputs,
                        "image_only_indicator": torch.full((b,), flag, device=self.device)}  # fmt: skip
                latents = sample(
                    fn, make_scheduler("ddim", self.frozen.noise_scheduler.config), latents=noise.to(self.device),
                    num_inference_steps=train.validation_steps, cond=cond,
                    uncond={"encoder_hidden_states": empty.to(self.device)},
                    guidance=guidance_schedule("constant", train.validation_guidance), progress=False,
                )  # fmt: skip
                out[mode].append(decode_latents(self.frozen.vae, latents).float().cpu())
            out["clips"].append(clips)
            low = inputs["low_res"].permute(0, 2, 1, 3, 4).float().cpu()  # b 3 f h w -> b f 3 h w
            out["low_res"].append(F.interpolate(low.flatten(0, 1), scale_factor=self.factor).reshape(clips.shape))
        return {key: torch.cat(value) for key, value in out.items()}

    def render(
        self, model_fn: Any, out_dir: Path, *, fps: float | None = None, batches: list[dict[str, Any]] | None = None
    ) -> Rendered:
        """Each held-out clip's low-res input (noised, enlarged), video upscale and original side by side:
        ``out_dir/<i>.mp4|gif``."""
        from lvdm.media import to_uint8_frames
        from lvdm.training.validation import Rendered, write_videos

        samples = self.samples or (self.upscaled(model_fn, [b for b in batches or [] if "video" in b]) if batches
                                   else {})  # fmt: skip
        if not samples:
            return Rendered()
        strips = torch.cat([samples["low_res"], samples["video"], samples["clips"]], dim=-1)  # n f 3 h 3w
        videos = np.stack([to_uint8_frames(clip) for clip in strips])
        files = write_videos(videos, out_dir, fps=fps)
        self.samples = {}
        return Rendered(files=files, videos={"upscaled": videos})
