"""Sampling with context frames: continuing a video, long videos by rollout, interpolation (Video LDM sec. 3.1.1).

A temporal module trained with ``model.context`` (see :mod:`lvdm.training.tasks`) takes given frames through its
context encoder. :class:`~lvdm.VideoPipeline` uses this module for three things:

- **continue** a video (``pipe(prompt, context=frames_or_file)``): new frames conditioned on its last
  ``context_frames`` frames;
- **rollout** (``num_frames`` beyond the module's training length ``T``): a first chunk of ``T`` frames from
  text (or from the given context), then chunk after chunk conditioned on the last ``context_frames`` frames made.
  No model call ever sees more than ``T`` frames, so memory stays flat in the length; the frames are decoded
  chunk by chunk at the end;
- **interpolate** a video by 4 (``pipe.interpolate(frames_or_file, factor=4)``): ``k`` keyframes become
  ``4 (k - 1) + 1`` frames, window by window (each window holds keyframes at 0, 4, 8, ... and fits in ``T``);
  16 is 4 twice, the second pass by the fine stage (flag 2) where the module was trained for it
  (``interpolate_fine``), else by the coarse stage again. The keyframes come back unchanged, latents and pixels.

Given frames are held exactly: the passes that take them see them clean at timestep 0
(:func:`~lvdm.modules.context_encoder.with_clean_context`, as in training), the pass without them sees them noised
to the step's level, and the result holds the given latents themselves (:class:`~lvdm.diffusion.KnownFrames`).
**Context guidance** ``s`` (``context_guidance``) extrapolates from the pass without the given frames,
``f(z) + s (f(z; c) - f(z))``, in the same batched forward as the text guidance.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lvdm.errors import ConfigError
from lvdm.pipeline_sampling import (
    denoise,
    encode_prompts,
    initial_noise,
    latent_size,
    negatives_for,
    resolve_settings,
    video_record,
)

if TYPE_CHECKING:
    from lvdm.outputs import VideoOutput
    from lvdm.sampling_settings import SamplingSettings

FACTORS = (4, 16)
STEP = 4  # one interpolation pass makes 3 frames between each pair of keyframes

NO_CONTEXT = (
    "this temporal module has no context support (it was trained without model.context), so it cannot {what}; "
    "train one with model.context=true and train.tasks={{text: 1, predict: 1, interpolate: 1}} "
    "(configs/demo_context.yaml shows how)"
)


@dataclass(frozen=True)
class ContextVideo:
    """Frames given by the user, as the model takes them."""

    frames: np.ndarray  # uint8 (f, h, w, 3) at the sampling size
    fps: float | None  # the file's frame rate, where known
    resized: str | None  # "WxH -> wxh, centre crop" when the frames were resized


def read_context(
    source: Any,
    height: int,
    width: int,
    *,
    what: str = "context",
    last: int | None = None,
    check: Callable[[int], None] | None = None,
) -> ContextVideo:
    """Frames from a video file (a still image is refused: give it as ``image=``) or a uint8 array ``(f, h, w, 3)``,
    resized to cover ``height x width`` and centre-cropped (as training clips are); a clear error for anything else.
    ``last``: only the last ``last`` frames (a continued video needs no more: every frame of a long one filled
    memory). ``check`` is called with the video's frame count before its frames are read (a file's: from its
    header)."""
    fps = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{what} video {path} does not exist or is not a file")
        from lvdm.data.readers import probe, read_frames
        from lvdm.errors import LvdmError

        try:
            info = probe(path)
            if check is not None:
                check(info.num_frames)
            size = _cover(info.width, info.height, height, width, None)
            first = 0 if last is None else max(0, info.num_frames - last)
            frames = read_frames(path, range(first, info.num_frames), size=size)
        except LvdmError as exc:
            raise ConfigError(f"{what} video {path}: {exc}") from exc
        fps, original = info.playback_fps(), (info.width, info.height)  # a 384 fps video lvdm wrote stays 384
    else:
        frames = frames_array(source, f"{what} frames", what=f"{what} video")
        if check is not None:
            check(len(frames))
        frames = frames if last is None else frames[max(0, len(frames) - last) :]
        original = (frames.shape[2], frames.shape[1])
        size = _cover(original[0], original[1], height, width, f"{what} video")
        if size != original:
            from PIL import Image

            frames = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])
    top, left = (frames.shape[1] - height) // 2, (frames.shape[2] - width) // 2
    frames = np.ascontiguousarray(frames[:, top : top + height, left : left + width])
    resized = None if original == (width, height) else f"{original[0]}x{original[1]} -> {width}x{height}, centre crop"
    return ContextVideo(frames, fps, resized)


def _cover(width: int, height: int, out_h: int, out_w: int, what: str | None) -> tuple[int, int]:
    """:func:`~lvdm.data.transforms.cover_size`, a :class:`ConfigError` (naming ``what``, if given) when the shape is
    too far from the output's."""
    from lvdm.data.transforms import cover_size

    try:
        return cover_size(width, height, out_h, out_w)
    except ValueError as exc:
        raise ConfigError(str(exc) if what is None else f"{what}: {exc}") from None


def frames_array(source: Any, name: str, *, what: str) -> np.ndarray:
    """``source`` (an array, a uint8 torch tensor on any device, a list of frames) as uint8 ``(f, h, w, 3)`` with
    ``f, h, w >= 1``; a :class:`ConfigError` naming ``name`` (the frames) or ``what`` (the argument) for anything
    else: frames of different sizes, a meta tensor, ``None`` or a number (they failed in numpy or torch, or divided
    by a zero height in the resize)."""
    if isinstance(source, torch.Tensor):  # numpy takes a cpu tensor only, and not every dtype
        if source.is_meta or source.dtype != torch.uint8:
            shape = tuple(source.shape)
            raise ConfigError(f"{name} must be uint8 (f, h, w, 3), got a {source.device.type} {source.dtype} {shape}")
        source = source.cpu()
    try:
        frames = np.asarray(source)
    except (ValueError, TypeError) as exc:  # frames of different sizes
        shapes = sorted({str(np.shape(frame)) for frame in source}) if isinstance(source, list | tuple) else []
        got = f"frames of shapes {', '.join(shapes)}" if shapes else f"{type(source).__name__} ({exc})"
        raise ConfigError(f"{name} must be uint8 (f, h, w, 3), frames of one size; got {got}") from None
    if frames.ndim == 0:  # None, a number, bytes
        raise ConfigError(
            f"{what} must be a video file (str or os.PathLike) or uint8 frames (f, h, w, 3), got {source!r}"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape[:3]:
        raise ConfigError(
            f"{name} must be uint8 (f, h, w, 3) with f, h, w >= 1, got {frames.dtype} {tuple(frames.shape)}"
        )
    return frames


def most_keyframes(factor: int) -> int:
    """The most frames an interpolation by ``factor`` takes: it makes ``factor (count - 1) + 1`` of ``count``, no
    more than a sampled video may have (``MAX_FRAMES``)."""
    from lvdm.sampling_settings import MAX_FRAMES

    return (MAX_FRAMES - 1) // factor + 1


def check_keyframes(count: int, factor: int) -> None:
    """No more than :func:`most_keyframes` to interpolate (a 300-frame clip by 16 sampled 4785 frames)."""
    from lvdm.sampling_settings import MAX_FRAMES

    most = most_keyframes(factor)
    if count > most:
        raise ConfigError(
            f"interpolating {count} frames by {factor} would make {factor * (count - 1) + 1}, past the {MAX_FRAMES} "
            f"frames a video may have; give at most {most} frames (cut the video first)"
        )


@torch.no_grad()
def encode_frames(vae: Any, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``(f, h, w, 3)`` -> scaled latents ``(1, c, f, h', w')`` (the posterior mean: deterministic)."""
    from lvdm.data.transforms import to_clip_tensor
    from lvdm.models.encoders import encode_video

    h, w = frames.shape[1:3]
    video = to_clip_tensor(frames, h, w, crop="center", flip=False, rng=random.Random(0))[None]
    mean = encode_video(vae, video.to(device)).float().chunk(2, dim=1)[0]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean - shift) * vae.config.scaling_factor


def rollout_chunks(total: int, length: int, given: int, context_frames: int) -> list[tuple[int, int]]:
    """``(given, new)`` frame counts of each chunk making ``total`` new frames with chunks of at most ``length``
    frames: the first conditioned on ``given`` frames (0: from text), then each on ``context_frames``."""
    if length <= context_frames:
        raise ConfigError(
            f"context_frames={context_frames} leaves no new frame in a {length}-frame chunk; use fewer context frames"
        )
    chunks, made = [], 0
    known = given
    while made < total:
        new = min(length - known, total - made)
        chunks.append((known, new))
        made += new
        known = context_frames
    return chunks


def seam_changes(frames: np.ndarray, chunks: list[tuple[int, int]]) -> tuple[list[float], list[float]]:
    """Mean absolute change (0-255) between consecutive frames of a rolled-out uint8 video ``(f, h, w, 3)``: at the
    seams between its ``chunks`` (as :func:`rollout_chunks` gives them), and everywhere else."""
    change = np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))  # change[i]: frame i -> i+1
    seams, made = set(), 0
    for _, new in chunks[:-1]:
        made += new
        seams.add(made - 1)  # the last frame of a chunk -> the first new frame of the next
    return [float(change[i]) for i in sorted(seams)], [float(c) for i, c in enumerate(change) if i not in seams]


def interpolation_windows(num_keyframes: int, length: int) -> list[tuple[int, int]]:
    """``(start, end)`` windows over the ``4 (k - 1) + 1`` output frames of one pass, each starting and ending on a
    keyframe and at most ``length`` frames long."""
    span = STEP * ((length - 1) // STEP)  # output frames between a window's first and last keyframe
    if span < STEP:
        raise ConfigError(
            f"this module was trained on {length}-frame clips; interpolating by {STEP} needs windows of at least "
            f"{STEP + 1} frames (train with data.num_frames >= {STEP + 1})"
        )
    total = STEP * (num_keyframes - 1) + 1
    return [(start, min(start + span, total - 1) + 1) for start in range(0, total - 1, span)]


# ------------------------------------------------------------------------------------------------ with a pipeline
def require_context(pipe: Any, what: str, *, task: str | None = None) -> None:
    defaults = pipe.defaults
    check_support(pipe.has_context, defaults.get("tasks"), what, task=task, every=defaults.get("interpolate_every"))


def check_support(
    has_context: bool, tasks: list[str] | None, what: str, *, task: str | None = None, every: int | None = None
) -> None:
    """That a module takes context frames to ``what`` (and was trained for ``task``, and to interpolate between
    keyframes ``every`` frames apart as sampling does): a pipeline's, or before it loads, a module file's
    (:func:`~lvdm.sampling_settings.temporal_defaults` ``has_context``, ``tasks``, ``interpolate_every``)."""
    if not has_context:
        raise ConfigError(NO_CONTEXT.format(what=what))
    if task is not None and tasks is not None and task not in tasks:
        raise ConfigError(
            f"this temporal module was trained for {', '.join(tasks) or 'text'} only, so it cannot {what}; "
            f"train it with {task} in train.tasks"
        )
    if task == "interpolate" and every not in (None, STEP):
        raise ConfigError(
            f"this module was trained to interpolate between keyframes {every} frames apart "
            f"(train.interpolate_every={every}); sampling interpolates by {STEP} per pass: train it with "
            f"train.interpolate_every={STEP}"
        )


def check_context_frames(pipe: Any, s: SamplingSettings) -> None:
    """A rollout or a continued video conditions each chunk on ``s.context_frames`` frames: no more than the module
    was trained to continue from (the largest of its ``train.predict_frames``, where its training config says)."""
    most = pipe.defaults.get("max_context_frames")
    if most is None or s.context_frames <= most:
        return
    if most == 0:
        raise ConfigError(
            "this temporal module was not trained to continue from given frames (no predict task with "
            f"train.predict_frames above 0), so it cannot continue a video or roll out past {pipe.chunk_length(s)} "
            "frames; ask for fewer frames, or train it with predict in train.tasks"
        )
    check_context_count(s.context_frames, most)


def default_context_frames(pipe: Any, s: SamplingSettings, *, explicit: dict[str, Any]) -> SamplingSettings:
    """``s`` with ``context_frames``, where the call left it unset (not in ``explicit``), the default within what
    the module learnt to continue from."""
    most = pipe.defaults.get("max_context_frames")
    if "context_frames" not in explicit and most:
        s = dataclasses.replace(s, context_frames=min(s.context_frames, most))
    return s


def is_rollout(
    pipe: Any, s: SamplingSettings, given: tuple | None, latents: torch.Tensor | None, *, explicit: dict[str, Any]
) -> bool:
    """Whether a call goes chunk by chunk (:func:`rollout`): it continues the ``given`` video, or makes more frames
    than the module's training length with a module that takes context. Each chunk draws its own noise, so no
    ``latents``. A call that does not refuses the context settings it was given (``explicit``): nothing takes them."""
    rollout = given is not None or (pipe.has_context and s.num_frames > pipe.chunk_length(s))
    if rollout:
        check_context_frames(pipe, s)
    else:
        _refuse_unused_context(pipe, s, explicit)
    if rollout and latents is not None:
        raise ConfigError("latents cannot be given for a rollout or a continued video (each chunk draws its own)")
    return rollout


def _refuse_unused_context(pipe: Any, s: SamplingSettings, explicit: dict[str, Any]) -> None:
    """``context_guidance`` and ``context_frames`` given to a call with no given frames (no context video, no
    rollout) were taken and ignored; the values a sidecar records for such a call (the defaults) pass."""
    from lvdm.sampling_settings import sampling_settings

    most = pipe.defaults.get("max_context_frames")
    default = sampling_settings().context_frames
    unused = [f"context_guidance={s.context_guidance:g}"] if s.context_guidance != 1.0 else []
    if "context_frames" in explicit and s.context_frames != (min(default, most) if most else default):
        unused.append(f"context_frames={s.context_frames}")
    if unused:
        raise ConfigError(
            f"{' and '.join(unused)}: this call has no given frames for them (no context video, and "
            f"num_frames={s.num_frames} is made in one pass); give context= (--context) or more frames, or drop them"
        )


def check_context_count(context_frames: int, most: int | None) -> None:
    """No more context frames than the module was trained to continue from (``most``; ``None`` or 0: unchecked)."""
    if most and context_frames > most:
        raise ConfigError(
            f"context_frames={context_frames}: this temporal module was trained to continue from at most {most} given "
            f"frame(s) (train.predict_frames); use 1 to {most}"
        )


def context_latents(pipe: Any, s: SamplingSettings, context: Any, *, explicit: dict) -> tuple | None:
    """The latents ``(1, c, k, h', w')`` of the ``context`` video to continue and how it was read, or
    ``None``; the errors of asking for context where it cannot work."""
    asked = context is not None or explicit.get("context_guidance", 1.0) != 1.0
    if s.image_mode and asked:
        raise ConfigError("image mode has no temporal layers to take context frames; drop context or image_mode")
    if asked:
        require_context(pipe, "continue a video" if context is not None else "use context guidance")
    if context is None:
        return None
    given = read_context(context, s.height, s.width, last=s.context_frames)
    if len(given.frames) < s.context_frames:
        raise ConfigError(
            f"the context video has {len(given.frames)} frame(s); context_frames={s.context_frames} needs at "
            f"least {s.context_frames}"
        )
    latents = encode_frames(pipe.base.vae, given.frames, pipe.device)
    source = str(Path(context).absolute()) if isinstance(context, (str, os.PathLike)) else "frames"
    return latents, {"source": source, "frames": s.context_frames, "resized": given.resized}


def rollout(
    pipe: Any,
    s: SamplingSettings,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    generators: list[torch.Generator],
    given: torch.Tensor | None,
    base_noise: torch.Tensor | int | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s.num_frames`` new frames for each video, chunk by chunk (:func:`~lvdm.context_sampling.rollout_chunks`);
    returns their clean latents and the noise each new frame started from."""
    from lvdm.modules.context_encoder import FLAGS

    b, c = len(generators), pipe.base.vae.config.latent_channels
    h, w = latent_size(pipe, s)
    known_first = given.shape[2] if given is not None else 0
    made, noises, previous = [], [], given
    for known, new in rollout_chunks(s.num_frames, pipe.chunk_length(s), known_first, s.context_frames):
        noise = initial_noise(pipe, s, (b, c, known + new, h, w), None, base_noise, generators)
        context = None
        if known:
            window = torch.zeros_like(noise)
            window[:, :, :known] = previous[:, :, -known:].to(window)
            mask = (torch.arange(known + new) < known)[None].expand(b, -1).to(pipe.device)
            context = (window, mask, FLAGS["none"])
        done = denoise(pipe, s, noise, cond, uncond, generators, progress, context=context)
        made.append(done[:, :, known:].cpu())
        noises.append(noise[:, :, known:].cpu())
        previous = done[:, :, -s.context_frames :]  # its given frames are held exactly: the video's last frames
    return torch.cat(made, dim=2), torch.cat(noises, dim=2)


def check_interpolation(factor: Any, prompt: Any, settings: dict[str, Any]) -> int:
    """The mistakes of an interpolation's arguments, before anything is read or asked of the module; ``factor`` as a
    plain ``int`` (numpy's integers are taken, and recorded in the sidecar as a number)."""
    from lvdm.sampling_settings import sampling_settings

    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor not in FACTORS:
        raise ConfigError(f"interpolation factor must be 4 or 16, got {factor!r}")
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a string (interpolation makes one video), got {prompt!r}")
    unset = sampling_settings()  # the defaults

    def changed(*keys: str) -> list[str]:  # the settings given other than their defaults
        return [key for key in keys if settings.get(key, getattr(unset, key)) != getattr(unset, key)]

    ignored = changed("num_frames", "num_videos_per_prompt", "context_frames", "image_as_first_frame")
    if ignored:  # they were taken and ignored
        raise ConfigError(
            "interpolation makes one video, its length set by the input and the factor, its given frames all the "
            f"input's: drop {ignored}"
        )
    if weights := changed("image_scale", "image_guidance_scale"):  # taken and ignored: there is no image to weigh
        given = ", ".join(f"{key}={settings[key]!r}" for key in weights)
        raise ConfigError(f"{given}: interpolation takes no image for them to weigh; drop them")
    return int(factor)


def interpolate(
    pipe: Any,
    video: Any,
    *,
    factor: int = 4,
    prompt: str = "",
    progress: bool = True,
    **settings: Any,
) -> VideoOutput:
    """:meth:`lvdm.VideoPipeline.interpolate` on ``pipe``: passes of 4 over windows of keyframes."""
    from lvdm.modules.context_encoder import FLAGS
    from lvdm.outputs import VideoOutput
    from lvdm.sampling_settings import MAX_FPS, sampling_settings

    factor = check_interpolation(factor, prompt, settings)
    require_context(pipe, "interpolate", task="interpolate")  # and between keyframes STEP frames apart
    # by 16: the second pass is the fine stage where the module learnt it, else the coarse stage again
    fine = "interpolate_fine" if "interpolate_fine" in (pipe.defaults.get("tasks") or ()) else "interpolate"
    stages = ["interpolate", fine][: 1 if factor == STEP else 2]
    s = resolve_settings(pipe, sampling_settings(**settings), None)
    if s.image_mode:
        raise ConfigError("image mode has no temporal layers to interpolate with; drop image_mode")
    negative = negatives_for(s.negative_prompt, [prompt])[0]  # a list of one is the one video's
    given = read_context(
        video, s.height, s.width, what="interpolate", check=lambda count: check_keyframes(count, factor)
    )
    if len(given.frames) < 2:
        raise ConfigError(f"interpolation needs at least 2 frames, the video has {len(given.frames)}")
    rate = given.fps or s.fps
    if rate * factor > MAX_FPS:  # the writers refuse it, after the sampling
        raise ConfigError(f"{rate:g} fps interpolated by {factor} would be {rate * factor:g} fps, past {MAX_FPS}")
    if not prompt and not negative:
        s = dataclasses.replace(s, guidance_scale=1.0)  # nothing to guide by: one pass per step
    generators = [torch.Generator().manual_seed(s.seed)]
    cond = {"encoder_hidden_states": encode_prompts(pipe, [prompt])}
    uncond = {"encoder_hidden_states": encode_prompts(pipe, [negative])}
    if pipe.image_part is not None:  # a module with image conditioning: no image, as its dropped images were
        from lvdm.image_sampling import image_conditions

        with_image, without, _ = image_conditions(pipe, None, 1)
        cond, uncond = cond | with_image, uncond | without
    latents = encode_frames(pipe.base.vae, given.frames, pipe.device)
    for n, stage in enumerate(stages):
        made = dataclasses.replace(s, fps=rate * STEP ** (n + 1))  # the rate of the frames this pass makes
        keys = latents.shape[2]
        out = torch.zeros(*latents.shape[:2], STEP * (keys - 1) + 1, *latents.shape[3:], device=pipe.device)
        out[:, :, ::STEP] = latents
        for start, end in interpolation_windows(keys, pipe.chunk_length(s)):
            mask = (torch.arange(start, end) % STEP == 0)[None].to(pipe.device)
            window = out[:, :, start:end]
            noise = initial_noise(pipe, s, tuple(window.shape), None, None, generators)
            context = (window.clone(), mask, FLAGS[stage])
            out[:, :, start:end] = denoise(pipe, made, noise, cond, uncond, generators, progress, context=context)
        latents = out
    frames = pipe.decode(latents, chunk_frames=s.decode_chunk_size)
    frames[0, ::factor] = given.frames  # the keyframes come back as given (not through the VAE)
    fps = rate * factor
    s = dataclasses.replace(s, fps=fps, num_frames=latents.shape[2])
    source = str(Path(video).absolute()) if isinstance(video, (str, os.PathLike)) else "frames"
    keyframes = len(given.frames)
    info = {
        "interpolate": {
            "source": source, "factor": factor, "keyframes": keyframes, "resized": given.resized, "stages": stages,
        }
    }  # fmt: skip
    record = video_record(pipe, s, prompt, negative, s.seed, info)
    return VideoOutput(frames, float(fps), [record], latents.cpu(), torch.zeros(0))
