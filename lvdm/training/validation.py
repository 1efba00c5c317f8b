"""What a run reports about itself: motion gains on held-out clips, sample videos and their frame metrics.

**Motion gain** (the headline): the same trained model, the same held-out clips, the same timesteps and noise, with
the order of the frames destroyed. ``loss_shuffled / loss_in_order``, where the shuffled pass permutes the frames
of each clean clip *and of its noise* with one random permutation per clip (the same ones at every validation), so
every frame meets exactly the noise it meets in order and only the temporal order differs. Above 1: the model uses
the order of the frames, i.e. motion. A model that ignores the order (or one trained on shuffled clips) gets 1.

Also reported, each the same model with information removed, not layers:

- ``motion_gain_each_frame`` = ``loss_each_frame / loss_in_order``: every frame denoised as its own 1-frame video
  through the same video model (temporal layers on, nothing to attend to): what the other frames are worth at all,
  ordered or not (it includes the colour and background the other frames share).
- ``layers_off_ratio`` = ``loss_layers_off / loss_in_order``: the frozen image model (image-only indicator set). It
  mixes two things, what the other frames tell and the extra trainable capacity of the temporal layers, so it is a
  secondary figure; on a poor base it is large with no motion learned at all.

At initialisation (temporal output projections at zero) all three ratios are exactly 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvdm.diffusion import diffusion_loss, guidance_schedule, make_scheduler, sample, sample_noise
from lvdm.errors import LvdmError
from lvdm.media import to_uint8_frames, write_gif, write_video
from lvdm.models.encoders import decode_latents, encode_text
from lvdm.training.step import Frozen, batch_latents_and_text, step_generator

GAIN_TIMESTEPS = (50, 200, 400, 600, 800, 950)
PASSES = ("in_order", "shuffled", "each_frame", "layers_off")


def shuffle_permutations(b: int, f: int, generator: torch.Generator) -> torch.Tensor:
    """``(b, f)`` frame orders, one random permutation per clip, never the identity (for ``f > 1``)."""
    rows = []
    for _ in range(b):
        order = torch.randperm(f, generator=generator)
        while f > 1 and torch.equal(order, torch.arange(f)):
            order = torch.randperm(f, generator=generator)
        rows.append(order)
    return torch.stack(rows)


def permute_frames(x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """``(b, c, f, h, w)`` with each clip's frames in ``orders[i]``."""
    # b f -> b 1 f 1 1, broadcast over channels and pixels
    index = orders.to(x.device)[:, None, :, None, None].expand_as(x)
    return torch.gather(x, 2, index)


def frames_as_videos(x: torch.Tensor) -> torch.Tensor:
    """``(b, c, f, h, w) -> ((b f), c, 1, h, w)``: every frame its own 1-frame video."""
    b, c, f, h, w = x.shape
    # b c f h w -> (b f) c 1 h w
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, 1, h, w)


def _pass_inputs(name: str, latents, noise, cond: dict, orders) -> tuple[torch.Tensor, torch.Tensor, dict, float]:
    """``(latents, noise, per-video inputs, image_only flag)`` of one pass of :func:`motion_gains`. Inputs with one
    entry per frame (``(b, c, f, h, w)``, an upscaler's low-res frames) move with their frames."""
    b, f = latents.shape[:3:2]
    per_frame = {key for key, value in cond.items() if value.ndim == 5 and value.shape[0:3:2] == (b, f)}
    if name == "shuffled":
        cond = {key: permute_frames(value, orders) if key in per_frame else value for key, value in cond.items()}
        return permute_frames(latents, orders), permute_frames(noise, orders), cond, 0.0
    if name == "each_frame":
        # every frame its own video: each video's inputs once per frame, b ... -> (b f) ...
        cond = {
            key: frames_as_videos(value) if key in per_frame else value.repeat_interleave(f, dim=0)
            for key, value in cond.items()
        }
        return frames_as_videos(latents), frames_as_videos(noise), cond, 0.0
    return latents, noise, cond, 1.0 if name == "layers_off" else 0.0


def no_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {}


@torch.no_grad()
def motion_gains(
    model_fn: Any,
    batches: list[dict[str, Any]],
    frozen: Frozen,
    device: torch.device,
    *,
    noise_prior: str = "independent",
    mixed_lambda: float = 0.5,
    inputs: Callable[[dict[str, Any]], dict[str, torch.Tensor]] = no_inputs,
) -> dict[str, float]:
    """The held-out loss of each pass (``loss_in_order``, ``loss_shuffled``, ``loss_each_frame``,
    ``loss_layers_off``) over ``batches`` at fixed timesteps, noise and shuffles, and ``motion_gain``,
    ``motion_gain_each_frame``, ``layers_off_ratio`` (each pass's loss / the in-order loss); see the module notes.
    The noise follows the run's prior (``noise_prior``, ``mixed_lambda``), as in training; ``inputs(batch)``: the
    model inputs each clip carries (its fps), as in training."""
    totals, count = dict.fromkeys(PASSES, 0.0), 0
    for number, batch in enumerate(batches):
        generator = step_generator(-1, 0, number)  # the same draws at every validation
        latents, text = batch_latents_and_text(batch, frozen, generator, device)
        b, f = latents.shape[0], latents.shape[2]
        orders = shuffle_permutations(b, f, generator)
        per_video = {"encoder_hidden_states": text} | inputs(batch)  # once per batch (an image's CLIP tokens)
        for t in GAIN_TIMESTEPS:
            noise = sample_noise(tuple(latents.shape), prior=noise_prior, mixed_lambda=mixed_lambda,
                                 generator=generator).to(device)  # fmt: skip
            for name in PASSES:
                x, eps, cond, flag = _pass_inputs(name, latents, noise, per_video, orders)
                n = x.shape[0]
                terms = diffusion_loss(
                    model_fn, x, frozen.noise_scheduler, noise=eps,
                    timesteps=torch.full((n,), t, dtype=torch.long, device=device),
                    image_only_indicator=torch.full((n,), flag, device=device), **cond,
                )  # fmt: skip
                totals[name] += float(terms.loss.mean())
            count += 1
    losses = {f"loss_{name}": total / max(count, 1) for name, total in totals.items()}
    base = max(totals["in_order"], 1e-12)
    return losses | {
        "motion_gain": totals["shuffled"] / base,
        "motion_gain_each_frame": totals["each_frame"] / base,
        "layers_off_ratio": totals["layers_off"] / base,
    }


def farthest_rates(rates: torch.Tensor) -> torch.Tensor:
    """For each rate of ``rates`` ``(n,)``: the one among them farthest from it in ratio (``|log a - log b|``), so
    a wrong rate is always one the held-out clips really have."""
    logs = rates.double().clamp(min=1e-6).log()
    return rates[(logs[:, None] - logs[None, :]).abs().argmax(dim=1)]


@torch.no_grad()
def removal_gain(
    model_fn: Any,
    batches: list[dict[str, Any]],
    frozen: Frozen,
    device: torch.device,
    removed: Callable[[int, dict[str, Any], dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    noise_prior: str = "independent",
    mixed_lambda: float = 0.5,
    inputs: Callable[[dict[str, Any]], dict[str, torch.Tensor]] = no_inputs,
) -> tuple[float, float]:
    """``(loss with, loss without)``: the held-out loss with each batch's model inputs (``inputs(batch)``) and with
    ``removed(number, batch, inputs)`` in their place; the same model, clips, timesteps and noise."""
    totals = [0.0, 0.0]
    for number, batch in enumerate(batches):
        generator = step_generator(-3, 0, number)  # the same draws at every validation
        latents, text = batch_latents_and_text(batch, frozen, generator, device)
        cond = {"encoder_hidden_states": text} | inputs(batch)
        variants = (cond, cond | removed(number, batch, cond))
        b = latents.shape[0]
        for t in GAIN_TIMESTEPS:
            noise = sample_noise(tuple(latents.shape), prior=noise_prior, mixed_lambda=mixed_lambda,
                                 generator=generator).to(device)  # fmt: skip
            for i, variant in enumerate(variants):
                terms = diffusion_loss(
                    model_fn, latents, frozen.noise_scheduler, noise=noise,
                    timesteps=torch.full((b,), t, dtype=torch.long, device=device), **variant,
                )  # fmt: skip
                totals[i] += float(terms.loss.mean())
    count = max(len(batches) * len(GAIN_TIMESTEPS), 1)
    return totals[0] / count, totals[1] / count


def fps_gains(model_fn: Any, batches: list[dict[str, Any]], frozen: Frozen, device: torch.device, **kw: Any):
    """``loss_true_fps`` (each held-out clip told its own frame rate), ``loss_wrong_fps`` (told the held-out rate
    farthest from its own, :func:`farthest_rates`) and ``fps_gain``, their ratio (:func:`removal_gain`: only the
    rate's information replaced). Above 1: the model reads the rate. When every held-out clip has one rate there is
    nothing to swap and no figure (``{}``)."""
    rates = torch.cat([batch["fps"].float() for batch in batches]) if batches else torch.zeros(0)
    if len(rates) < 2 or bool((rates == rates[0]).all()):
        return {}
    wrong = farthest_rates(rates).split([len(batch["fps"]) for batch in batches])
    swap = lambda number, batch, cond: {"fps": wrong[number].to(device)}  # noqa: E731
    true, swapped = removal_gain(model_fn, batches, frozen, device, swap, **kw)
    return {"loss_true_fps": true, "loss_wrong_fps": swapped, "fps_gain": swapped / max(true, 1e-12)}


def image_gains(model_fn: Any, batches: list[dict[str, Any]], frozen: Frozen, device: torch.device, **kw: Any):
    """``loss_with_image`` (each held-out clip's first frame as the image), ``loss_without_image`` (the image dropped:
    the encoder's all-zero input, as in training) and ``image_gain``, their ratio (:func:`removal_gain`). Above 1:
    the model uses the image."""
    from lvdm.training.step import image_inputs

    drop = lambda number, batch, cond: {"image_embeds": image_inputs(batch, frozen, None, None, drop_all=True)}  # noqa: E731
    with_image, without = removal_gain(model_fn, batches, frozen, device, drop, **kw)
    return {
        "loss_with_image": with_image,
        "loss_without_image": without,
        "image_gain": without / max(with_image, 1e-12),
    }


# ------------------------------------------------------------------------------------------------- frame metrics
def frame_metrics(videos: np.ndarray) -> dict[str, float]:
    """``frame_change`` (mean absolute change between consecutive frames, 0-255) and ``frame_correlation`` (mean
    Pearson correlation of consecutive frames' pixels) of uint8 videos ``(n, f, h, w, 3)`` or one ``(f, h, w, 3)``."""
    videos = np.asarray(videos, dtype=np.float64)
    videos = videos[None] if videos.ndim == 4 else videos
    if videos.shape[1] < 2:
        raise ValueError(f"frame metrics need at least 2 frames, got {videos.shape[1]}")
    # n f h w c -> n f (h w c)
    flat = videos.reshape(*videos.shape[:2], -1)
    a, b = flat[:, :-1], flat[:, 1:]
    change = np.abs(b - a).mean()
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    denom = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    corr = np.where(denom > 0, (a * b).sum(-1) / np.maximum(denom, 1e-12), 1.0)  # two flat frames: identical
    return {"frame_change": float(change), "frame_correlation": float(corr.mean())}


def clip_frames(batches: list[dict[str, Any]]) -> np.ndarray:
    """The clips of video batches as uint8 ``(n, f, h, w, 3)`` (batches from the latent cache hold no frames)."""
    videos = [to_uint8_frames(v) for batch in batches if "video" in batch for v in batch["video"].float()]
    return np.stack(videos) if videos else np.zeros((0, 2, 1, 1, 3), np.uint8)


# ------------------------------------------------------------------------------------------------- samples
@torch.no_grad()
def render_videos(
    model_fn: Any,
    frozen: Frozen,
    prompts: list[str],
    *,
    num_frames: int,
    latent_size: tuple[int, int],
    latent_channels: int,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    image_mode: bool = False,
    noise_prior: str = "independent",
    mixed_lambda: float = 0.5,
    inputs: dict[str, Any] | list[dict[str, Any]] | None = None,
    uncond_inputs: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> np.ndarray:
    """Each prompt rendered (DDIM, classifier-free guidance) as uint8 ``(n, f, h, w, 3)``.

    ``image_mode``: the image-only indicator set, i.e. the frozen image model draws every frame alone, from the
    video's initial noise. That noise follows ``noise_prior`` (the run's training prior): with ``mixed`` the frames
    share part of it, so image mode's frames then correlate more than frames drawn from independent noise.
    ``inputs``: more model inputs, the same for every video (``{"fps": 8.0}``) or one dict per prompt (a picture
    to animate); ``uncond_inputs``: what the unconditional pass takes instead (no picture).
    """
    scheduler = make_scheduler("ddim", frozen.noise_scheduler.config)
    empty = frozen.empty_text.to(device).float()
    videos = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        shape = (1, latent_channels, num_frames, *latent_size)
        noise = sample_noise(shape, prior=noise_prior, mixed_lambda=mixed_lambda, generator=generator).to(device)
        text = encode_text(frozen.tokenizer, frozen.text_encoder, [prompt]).to(device, torch.float32)
        flag = torch.full((1,), float(image_mode), device=device)
        given = inputs[i] if isinstance(inputs, list) else inputs or {}
        cond = {"encoder_hidden_states": text, "image_only_indicator": flag, **given}
        latents = sample(
            model_fn, scheduler, latents=noise, num_inference_steps=steps, cond=cond,
            uncond={"encoder_hidden_states": empty, **(uncond_inputs or {})},
            guidance=guidance_schedule("constant", guidance_scale),
            generator=generator, progress=False,
        )  # fmt: skip
        video = decode_latents(frozen.vae, latents)[0].float().cpu()
        if not bool(torch.isfinite(video).all()):
            raise LvdmError(
                f"the validation sample of {prompt!r} holds NaN or infinite values: its predictions blew up at "
                f"guidance {guidance_scale:g} (train.validation_guidance); the weights of this step may be damaged"
            )
        videos.append(to_uint8_frames(video))
    return np.stack(videos)


def write_videos(videos: np.ndarray, out_dir: Path, *, fps: float | None = None, prefix: str = "") -> list[Path]:
    """``out_dir/<prefix><i>.mp4`` and ``.gif`` for each uint8 video ``(f, h, w, 3)``, at ``fps`` (default: sampling's
    default rate); the GIF at most at :data:`~lvdm.media.MAX_GIF_FPS` (clips of 120 fps: a GIF cannot play faster)."""
    from lvdm.media import MAX_GIF_FPS
    from lvdm.sampling_settings import DEFAULT_FPS

    fps = fps or DEFAULT_FPS
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, frames in enumerate(videos):
        written += [
            write_video(frames, out_dir / f"{prefix}{i:02d}.mp4", fps=fps),
            write_gif(frames, out_dir / f"{prefix}{i:02d}.gif", fps=min(fps, MAX_GIF_FPS)),
        ]
    return written


@dataclass
class Rendered:
    """What a validation rendered: the files, the videos by kind (uint8 ``(n, f, h, w, 3)``) and their figures."""

    files: list[Path] = field(default_factory=list)
    videos: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)


def render_validation(
    model_fn: Any, frozen: Frozen, prompts: list[str], out_dir: Path, *, fps: float = 8.0, **render: Any
) -> Rendered:
    """The prompts as videos (``out_dir/<i>.mp4|gif``) and in image mode (``out_dir/image_mode_<i>.mp4|gif``: every
    frame drawn by the frozen image model from its own noise, the reference a video model must beat), with
    ``samples_frame_change`` / ``_correlation`` and ``image_mode_frame_change`` / ``_correlation``
    (:func:`frame_metrics`)."""
    out = Rendered()
    for kind, image_mode, prefix in (("samples", False, ""), ("image_mode", True, "image_mode_")):
        videos = render_videos(model_fn, frozen, prompts, image_mode=image_mode, **render)
        out.files += write_videos(videos, out_dir, fps=fps, prefix=prefix)
        out.videos[kind] = videos
        if videos.shape[1] > 1:  # data.num_frames=1: no consecutive frames to compare
            out.figures |= {f"{kind}_{k}": v for k, v in frame_metrics(videos).items()}
    return out


def clip_figures(batches: list[dict[str, Any]]) -> dict[str, float]:
    """``clips_frame_change`` / ``clips_frame_correlation`` of the held-out clips (none from a latent cache or of
    one-frame clips)."""
    clips = clip_frames(batches)
    return {f"clips_{k}": v for k, v in frame_metrics(clips).items()} if len(clips) and clips.shape[1] > 1 else {}


GIF_MAX_SIDE = 65535  # a GIF's width and height are 16-bit


def gif_summary(tag: str, videos: np.ndarray, *, fps: float = 8.0) -> Any:
    """A TensorBoard image summary holding uint8 videos ``(n, f, h, w, 3)`` side by side as one animated GIF: as many
    as fit in a GIF's width (65535 px: the first 127 of 512 px wide samples); the files hold every one."""
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    videos = np.asarray(videos, dtype=np.uint8)
    # n f h w c -> f h (n w) c: the videos next to each other
    strip = np.concatenate(list(videos[: max(1, GIF_MAX_SIDE // videos.shape[3])]), axis=2)
    frames = [Image.fromarray(frame) for frame in strip]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    height, width = strip.shape[1:3]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])
