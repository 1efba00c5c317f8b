"""The settings of one sampling call, defined once: typed, defaulted, validated (VideoPipeline, sample.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lvdm.configlib import config_from_dict, option
from lvdm.errors import ConfigError, TemporalModuleError

if TYPE_CHECKING:
    import torch  # not at import: sample.py --help reads these settings, and torch took most of its 2 s

DEFAULT_FRAMES = 16
DEFAULT_FPS = 8.0
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
DEFAULT_NOISE_PRIOR = "independent"  # where neither the call nor the module's training config names one
DEFAULT_MIXED_LAMBDA = 0.5  # the mixed prior's base-noise share where neither the call nor the module names one
SIZE_MULTIPLE = 8  # SD's rule for pixel sizes (its VAE downsamples by 8)
MAX_FRAMES = 4096  # frames per sampled video (a rollout beyond the module's length included)
MAX_SIDE = 8192  # pixels
MAX_STEPS = 1000  # at most the training timesteps (SD's 1000)
MAX_GUIDANCE = 100  # guidance weights (and schedule options) within +-this
MAX_SEED = 2**63 - 1
MAX_FPS = 1000  # frames per second written: the limit of lvdm.media's writers, and of the settings
MIN_FPS = 0.01  # a frame per 100 s: below about 0.0015 a GIF's 16-bit delay overflows, below 0.001 an mp4's rate


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SamplingSettings:
    """Everything a sampling call can set, each field typed, defaulted, documented and checked once.

    ``None`` sizes, frame count and fps are filled per call: from the temporal module's training config when one
    is loaded (``data.num_frames``, ``data.resolution``, and :func:`training_fps`: ``data.target_fps`` or the
    clips' source fps / stride), else 16 frames, the base's native size and 8 fps.
    """

    negative_prompt: str | list[str] | None = option(None, "what to steer away from, one or one per prompt")
    num_frames: int | None = option(
        None, "frames per video (null: the module's training value, else 16)", min=1, max=MAX_FRAMES
    )
    height: int | None = option(
        None, "height in pixels (null: the module's, else the base's)", min=8, max=MAX_SIDE, multiple_of=SIZE_MULTIPLE
    )
    width: int | None = option(
        None, "width in pixels (null: the module's, else the base's)", min=8, max=MAX_SIDE, multiple_of=SIZE_MULTIPLE
    )
    fps: float | None = option(
        None,
        "frame rate of the written video, and the motion speed of a module trained with fps conditioning "
        "(null: the module's training rate, else 8)",
        min=MIN_FPS,
        max=MAX_FPS,
    )
    num_inference_steps: int | None = option(
        None, "denoising steps (null: a distilled module's own, else 25)", min=1, max=MAX_STEPS
    )
    scheduler: str | None = option(
        None,
        "sampler: ddim, ddim_trailing, dpmpp, euler, euler_a, ddpm or unipc (null: a distilled module's own, else "
        "ddim)",
    )
    guidance_scale: float | None = option(
        None,
        "classifier-free guidance weight (1: the conditional model only; null: a distilled module's own, the middle "
        "of the range it was distilled for, else 7.5)",
        min=-MAX_GUIDANCE,
        max=MAX_GUIDANCE,
    )
    guidance_schedule: str = option("constant", "guidance weight over the steps: constant, oscillating or linear")
    guidance_options: dict[str, Any] = option({}, "options of the schedule, e.g. {low: 1.0, warmup: 0.2}")
    guidance_rescale: float = option(0.0, "guidance rescale phi (Lin et al. 2023; 0.7 for v-prediction)", min=0, max=1)
    threshold: str | None = option(None, "'clamp:VALUE' or 'percentile:Q[:BOUND]' on the predicted clean latents")
    noise_prior: str | None = option(
        None,
        "noise: independent, or mixed (VideoFusion's shared base); null: the module's training prior, else "
        "independent",
    )
    mixed_lambda: float | None = option(
        None, "mixed prior: base noise share (frame-to-frame correlation); null: the module's, else 0.5", min=0, max=1
    )
    seed: int | None = option(
        None, "seed of the first video; video k uses seed + k (null: a random seed)", min=0, max=MAX_SEED
    )
    num_videos_per_prompt: int = option(1, "videos per prompt, each from its own seed", min=1, max=1000)
    image_mode: bool = option(False, "bypass the temporal layers: the frames are independent images")
    context_frames: int = option(
        2,
        "rollout and continuing a video: the last frames each new chunk is conditioned on (at most the largest of "
        "the module's train.predict_frames)",
        min=1,
    )
    context_guidance: float = option(
        1.0, "context guidance s (1: off): f(z) + s (f(z; given frames) - f(z)), in the same forward as the text's",
        min=-MAX_GUIDANCE, max=MAX_GUIDANCE,
    )  # fmt: skip
    image_scale: float = option(
        1.0, "image conditioning: weight of the image attention beside the text's", min=0, max=MAX_GUIDANCE
    )
    image_guidance_scale: float | None = option(
        None, "guidance on the image (null: the text's guidance_scale, one guidance on both)", min=0, max=MAX_GUIDANCE
    )
    image_as_first_frame: bool = option(
        False, "image conditioning with context frames: the image is also the context the video continues from"
    )
    decode_chunk_size: int = option(8, "frames per VAE decode call (less memory when smaller)", min=1)
    batch_size: int | None = option(None, "videos denoised together (null: all of a call at once)", min=1)

    def validate(self) -> list[str]:
        """Names (with a did-you-mean) and options that the field types cannot check."""
        from lvdm.diffusion import NOISE_PRIORS, SAMPLERS
        from lvdm.diffusion._common import lookup

        problems = []
        for key, registry, what in (("scheduler", SAMPLERS, "sampler"), ("noise_prior", NOISE_PRIORS, "noise prior")):
            try:
                if getattr(self, key) is not None:
                    lookup(registry, getattr(self, key), what)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
        problems += _guidance_problems(self)
        if self.threshold is not None:
            try:
                parse_threshold(self.threshold)
            except ConfigError as exc:
                problems.append(f"threshold: {exc}")
        return problems


SETTING_NAMES = tuple(field.name for field in dataclasses.fields(SamplingSettings))  # what ``**settings`` take


def _guidance_problems(settings: SamplingSettings) -> list[str]:
    from lvdm.diffusion import GUIDANCE_SCHEDULES, guidance_schedule
    from lvdm.diffusion._common import lookup

    name = settings.guidance_schedule
    try:
        lookup(GUIDANCE_SCHEDULES, name, "guidance schedule")
    except ValueError as exc:
        return [f"guidance_schedule: {exc}"]
    options = settings.guidance_options
    allowed = [f.name for f in dataclasses.fields(GUIDANCE_SCHEDULES[name]) if f.name != "scale"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        return [f"guidance_options: {unknown} are not options of the {name!r} schedule; it takes {allowed}"]
    kinds = {f.name: str(f.type) for f in dataclasses.fields(GUIDANCE_SCHEDULES[name])}
    for key, value in options.items():
        if kinds[key] == "bool" and not isinstance(value, bool):
            return [f"guidance_options: {key} must be true or false, got {value!r}"]
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if kinds[key] != "bool" and not (number and -MAX_GUIDANCE <= value <= MAX_GUIDANCE):
            return [f"guidance_options: {key} must be a number in -{MAX_GUIDANCE} .. {MAX_GUIDANCE} (a guidance "
                    f"weight or fraction), got {value!r}"]  # fmt: skip
    try:
        scale = settings.guidance_scale
        guidance_schedule(name, DEFAULT_GUIDANCE if scale is None else scale, **options)
    except (TypeError, ValueError) as exc:
        return [f"guidance_options: {exc}"]
    return []


def sampling_settings(**settings: Any) -> SamplingSettings:
    """Check ``settings`` (keyword names of :class:`SamplingSettings`); every problem in one :class:`ConfigError`.

    Unknown names get a did-you-mean. The error is one line (problems joined by ``; ``) and keeps ``.problems``.
    """
    try:
        return config_from_dict(settings, SamplingSettings)
    except ConfigError as exc:
        problems = getattr(exc, "problems", [str(exc)])
        error = ConfigError("invalid sampling settings: " + "; ".join(problems))
        error.problems = problems
        raise error from None


def parse_threshold(text: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``"clamp:4"`` or ``"percentile:0.995[:3]"`` -> an ``x0 -> x0`` function (:func:`~lvdm.diffusion.threshold_x0`).

    Applied to the clean latents each model output implies. SD latents are unbounded (roughly unit std), so these
    are heuristics against blow-ups at high guidance, not Imagen's pixel-space bound: clamp at 3-4, and give
    percentile mode a ``BOUND`` of 3-4 (with the default 1 it shrinks nearly every latent).
    """
    from lvdm.diffusion import threshold_x0
    from lvdm.diffusion.guidance import THRESHOLDS

    mode, *numbers = text.split(":")
    try:
        values = [float(number) for number in numbers]
    except ValueError:
        values = []
    if mode not in THRESHOLDS or not 1 <= len(values) <= 2 or (mode == "clamp" and len(values) != 1):
        raise ConfigError(f"expected 'clamp:VALUE' or 'percentile:Q[:BOUND]', got {text!r}")
    value, bound = values[0], values[1] if len(values) == 2 else 1.0
    if not (value > 0 and bound > 0) or not math.isfinite(value + bound) or (mode == "percentile" and value > 1):
        raise ConfigError(f"{text!r}: values must be finite and > 0 (a percentile's Q in (0, 1])")
    return functools.partial(threshold_x0, mode=mode, value=value, bound=bound)


def temporal_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """``num_frames``, ``height``, ``width``, ``fps``, ``noise_prior`` and ``mixed_lambda`` from a temporal module's
    training config (``None`` if unset), what it was trained for (``tasks``, ``max_context_frames``, ...) and whether
    it takes context frames (``has_context``) or an image (``has_image``).

    Reads only the file's header; a missing file or one that is not a temporal module is a
    :class:`~lvdm.errors.TemporalModuleError`.
    """
    from lvdm.models.animatediff import is_motion_module
    from lvdm.models.temporal_file import read_temporal_metadata

    if is_motion_module(path):  # an AnimateDiff module records no training config: lvdm's own defaults
        metadata = {}
    elif not Path(path).is_file():
        what = "is not a module file or a MotionAdapter folder" if Path(path).exists() else "does not exist"
        raise TemporalModuleError(f"temporal module {path} {what}")
    else:
        metadata = read_temporal_metadata(path)
    try:
        config = json.loads(metadata.get("training_config", "{}"))
        parts = json.loads(metadata.get("parts", "{}"))  # checked by read_temporal_metadata: objects of objects
    except (ValueError, RecursionError):
        config, parts = {}, {}
    config = config if isinstance(config, dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    resolution = data.get("resolution")
    if isinstance(resolution, int):
        resolution = [resolution, resolution]
    height, width = resolution if isinstance(resolution, list) and len(resolution) == 2 else (None, None)
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    tasks = train.get("tasks") if isinstance(train.get("tasks"), dict) else None  # None: not recorded
    trained = sorted(str(task) for task, w in (tasks or {}).items() if type(w) in (int, float) and w > 0)
    return {
        "num_frames": data.get("num_frames"), "height": height, "width": width, "fps": training_fps(config),
        **training_prior(config),
        "tasks": trained,
        "interpolate_every": train.get("interpolate_every") if type(train.get("interpolate_every")) is int else None,
        "max_context_frames": _most_given(train.get("predict_frames"), tasks),
        "has_context": any(part.get("kind") == "context" for part in parts.values()),
        "has_image": any(part.get("kind") == "image" for part in parts.values()),
        **distilled_for(config),
    }  # fmt: skip


def _most_given(predict_frames: Any, tasks: dict[str, Any] | None) -> int | None:
    """The most leading frames the module was trained to continue from: the largest of ``train.predict_frames``
    where ``predict`` is among its tasks (as training reads them), 0 where it is not (``{}``: text only), ``None``
    where its training config does not say."""
    if tasks is not None and not (type(tasks.get("predict")) in (int, float) and tasks["predict"] > 0):
        return 0
    if isinstance(predict_frames, list) and predict_frames and all(type(n) is int for n in predict_frames):
        return max(predict_frames)
    return None


def distilled_for(training_config: dict[str, Any]) -> dict[str, Any]:
    """What a distilled student (``train.target: distill``) samples with: its steps, its sampler
    (``ddim_trailing``), whether a spatial LoRA goes with it, and the guidance range it was distilled for (the
    weight is its input, untrained outside) with its middle as the default weight; ``{}`` for any other module."""
    train = training_config.get("train") if isinstance(training_config.get("train"), dict) else {}
    model = training_config.get("model") if isinstance(training_config.get("model"), dict) else {}
    steps = train.get("distill_to")
    if train.get("target") != "distill" or type(steps) is not int or steps < 1:
        return {}
    found = {
        "num_inference_steps": steps, "scheduler": "ddim_trailing",
        "distilled_lora": type(model.get("spatial_lora_rank")) is int and model["spatial_lora_rank"] > 0,
    }  # fmt: skip
    pair = train.get("distill_guidance")
    numbers = isinstance(pair, list) and len(pair) == 2 and all(type(w) in (int, float) for w in pair)
    if numbers and all(map(math.isfinite, pair)) and pair[0] <= pair[1]:
        found |= {"guidance_range": [float(w) for w in pair], "guidance_scale": (pair[0] + pair[1]) / 2}
    return found


def training_prior(training_config: dict[str, Any]) -> dict[str, Any]:
    """``noise_prior`` and ``mixed_lambda`` a module was trained with (``train.noise_prior``,
    ``train.mixed_noise_lambda``), so that sampling draws noise like training did; ``None`` where unknown."""
    from lvdm.diffusion import NOISE_PRIORS

    train = training_config.get("train") if isinstance(training_config.get("train"), dict) else {}
    prior, share = train.get("noise_prior"), train.get("mixed_noise_lambda")
    return {
        "noise_prior": prior if isinstance(prior, str) and prior in NOISE_PRIORS else None,
        "mixed_lambda": float(share) if type(share) in (int, float) and 0 <= share <= 1 else None,
    }


def training_fps(training_config: dict[str, Any]) -> float | None:
    """The frame rate a module was trained at: ``data.target_fps`` (a range's geometric middle), else the clips'
    own rate (source fps / stride, which the trainer records as ``clip_fps``), else ``None``."""
    data = training_config.get("data") if isinstance(training_config.get("data"), dict) else {}
    target = data.get("target_fps")
    if isinstance(target, list) and len(target) == 2 and all(type(v) in (int, float) and v > 0 for v in target):
        target = math.sqrt(target[0] * target[1])  # a range of rates: its middle speed (rates were drawn log-uniform)
    for value in (target, training_config.get("clip_fps")):
        if type(value) in (int, float) and 0 < value <= 1000:  # NaN, inf and absurd rates count as unknown
            return float(value)
    return None
