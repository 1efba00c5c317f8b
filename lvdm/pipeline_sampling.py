"""The steps of one :class:`~lvdm.VideoPipeline` call: its settings resolved, its initial noise, the denoiser and
the sampling loop around it (classifier-free, context and image guidance batched into one forward per step), the
text encoded and each video's sidecar record.

They are functions of the pipeline: :class:`~lvdm.pipeline.VideoPipeline` keeps the calls people make, and it and
:mod:`lvdm.context_sampling` (chunk by chunk and window by window) call these; the helpers at the end are
shared by ``__call__`` and ``render``. Seeds follow the rule in :mod:`lvdm.pipeline`: video ``k`` of a call draws
from its own generator, seeded ``seed + k``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import numbers
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lvdm import __version__
from lvdm.configlib import config_to_dict
from lvdm.errors import ConfigError
from lvdm.sampling_settings import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_MIXED_LAMBDA,
    DEFAULT_NOISE_PRIOR,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_SEED,
    SamplingSettings,
    parse_threshold,
    sampling_settings,
)


def resolve_settings(pipe: Any, s: SamplingSettings, latents: torch.Tensor | None) -> SamplingSettings:
    """Fill unset frames, size, fps and seed: from ``latents``, the module's training config, or the base."""
    native = pipe.base.unet.config.sample_size * pipe.vae_scale_factor
    given = {}
    if latents is not None:
        check_noise("latents", latents)
        if latents.ndim != 5:
            raise ConfigError(f"latents must be (b, c, f, h, w), got shape {tuple(latents.shape)}")
        f, h, w = latents.shape[2:]
        given = {"num_frames": f, "height": h * pipe.vae_scale_factor, "width": w * pipe.vae_scale_factor}
    fallback = {
        "num_frames": DEFAULT_FRAMES, "height": native, "width": native, "fps": DEFAULT_FPS,
        "noise_prior": DEFAULT_NOISE_PRIOR, "mixed_lambda": DEFAULT_MIXED_LAMBDA, "num_inference_steps": DEFAULT_STEPS,
        "scheduler": "ddim", "guidance_scale": DEFAULT_GUIDANCE,
    }  # fmt: skip
    values, from_module = {}, []
    for key, default in fallback.items():
        value = getattr(s, key)
        if value is None and key not in given and pipe.defaults.get(key) is not None:
            from_module.append(key)
        values[key] = value if value is not None else given.get(key, pipe.defaults.get(key, default))
    values["seed"] = s.seed if s.seed is not None else random_seed()

    def origin(message: str) -> str:
        return from_the_module(message, {key: values[key] for key in from_module})

    try:
        resolved = sampling_settings(**{**config_to_dict(s), **values})
    except ConfigError as exc:
        raise ConfigError(origin(str(exc))) from exc
    problems = [
        f"{key}={getattr(resolved, key)}: must be divisible by the VAE's factor {pipe.vae_scale_factor}"
        for key in ("height", "width")
        if getattr(resolved, key) % pipe.vae_scale_factor
    ]
    low, high = pipe.defaults.get("guidance_range", (-MAX_GUIDANCE, MAX_GUIDANCE))
    one_pass = pipe.distilled and not resolved.image_mode  # image mode: the base, with two passes
    if one_pass and not low <= resolved.guidance_scale <= high:
        problems.append(
            f"guidance_scale={resolved.guidance_scale:g}: this distilled module takes a guidance weight in "
            f"{low:g} .. {high:g}, the range it was distilled for (train.distill_guidance); its weight is an input, "
            "untrained outside it"
        )
    if one_pass and (resolved.guidance_schedule != "constant" or resolved.guidance_rescale):
        problems.append(
            "guidance_schedule / guidance_rescale: a distilled module takes one guidance weight as an input, "
            "constant over the steps, and no second pass to rescale"
        )
    table = pipe.video.layout.max_frames if pipe.video is not None else None
    if table is not None and resolved.num_frames > table and not pipe.has_context:
        problems.append(
            f"num_frames={resolved.num_frames}: this module's motion modules encode at most {table} frames"
        )
    if problems:
        raise ConfigError(origin("; ".join(problems)))
    return resolved


def from_the_module(message: str, taken: dict[str, Any]) -> str:
    """``message`` refusing settings, saying which of them the user never set: ``taken`` from the temporal module's
    training config."""
    named = [f"{key}={value!r}" for key, value in taken.items() if re.search(rf"\b{key}\s*[:=]", message)]
    return f"{message} (the temporal module's training config gave {', '.join(named)}; set them)" if named else message


def initial_noise(
    pipe: Any,
    s: SamplingSettings,
    shape: tuple[int, ...],
    latents: torch.Tensor | None,
    base_noise: torch.Tensor | int | None,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """The given ``latents``, or noise from the prior, each video from its own generator (float32)."""
    from lvdm.diffusion import sample_noise

    if latents is not None:
        if base_noise is not None:  # taken and ignored (and recorded in the sidecars as if used)
            raise ConfigError("base_noise is the shared part of the initial noise, which latents gives whole: give "
                              "one of them")  # fmt: skip
        if tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape} for these settings, got {tuple(latents.shape)}")
        return latents.to(device=pipe.device, dtype=torch.float32)
    check_base_noise_seed(base_noise, s.noise_prior)
    base = _base_noise(base_noise, shape) if base_noise is not None else None
    return sample_noise(
        shape, prior=s.noise_prior, mixed_lambda=s.mixed_lambda, base_noise=base,
        generator=generators, device=pipe.device,
    )  # fmt: skip


def denoise(
    pipe: Any,
    s: SamplingSettings,
    noise: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    generators: list[torch.Generator],
    progress: bool,
    *,
    context: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """One batch of videos through the sampler, CFG (and context and image guidance) batched into one forward
    per step.

    ``cond`` / ``uncond``: the model inputs of the conditional / unconditional pass (``encoder_hidden_states``,
    and ``image_embeds`` with image conditioning); ``context``: ``(latents (b, c, f, h', w'), mask (b, f),
    flag)``, the given frames of each video."""
    from lvdm.diffusion import KnownFrames, guidance_schedule, make_scheduler, sample, step_noise_for

    conditions, known, free, image_only = dict(cond), None, None, None
    if "image_embeds" in cond:
        conditions["image_scale"] = s.image_scale
        if s.image_guidance_scale is not None:  # the pass with the image but not the text
            image_only = {"encoder_hidden_states": uncond["encoder_hidden_states"]}
    if pipe.has_fps:  # the motion speed asked for: the module was trained with it (model.fps_conditioning)
        conditions["fps"] = torch.full((noise.shape[0],), float(s.fps), device=pipe.device)
    guidance = guidance_schedule(s.guidance_schedule, s.guidance_scale, **s.guidance_options)
    if pipe.distilled and not s.image_mode:  # the weight is the student's input: one forward per step
        conditions["guidance_scale"] = torch.full((noise.shape[0],), float(s.guidance_scale), device=pipe.device)
        guidance = None
    model_fn = pipe.model_fn(image_mode=s.image_mode)
    if context is not None:
        from lvdm.modules.context_encoder import with_clean_context

        model_fn = with_clean_context(model_fn)  # the given frames clean, at timestep 0, as in training
        latents, mask, flag = context
        flags = torch.full((noise.shape[0],), flag, dtype=torch.long, device=pipe.device)
        conditions |= {"context_latents": latents, "context_mask": mask, "context_flag": flags}
        known = KnownFrames(latents, mask, noise)
        free = {"context_mask": torch.zeros_like(mask)}
    return sample(
        model_fn,
        make_scheduler(s.scheduler, pipe.base.scheduler.config),
        latents=noise,
        num_inference_steps=s.num_inference_steps,
        cond=conditions,
        uncond=uncond,
        known=known,
        context_free=free,
        context_guidance=s.context_guidance if context is not None else 1.0,
        image_only=image_only,
        image_guidance=s.image_guidance_scale if image_only is not None else None,
        guidance=guidance,
        guidance_rescale=s.guidance_rescale,
        threshold=parse_threshold(s.threshold) if s.threshold else None,
        generator=generators,  # one per video: scheduler noise (ddpm, euler_a) also follows each video's seed
        step_noise=step_noise_for(s.noise_prior, s.mixed_lambda),  # that noise follows the prior too
        progress=progress,
    )


def latent_size(pipe: Any, s: SamplingSettings) -> tuple[int, int]:
    """The latent height and width of the frames ``s`` asks for."""
    return s.height // pipe.vae_scale_factor, s.width // pipe.vae_scale_factor


@torch.no_grad()
def encode_prompts(pipe: Any, texts: list[str]) -> torch.Tensor:
    """The text encoder's hidden states of ``texts``, ``(len(texts), n_tokens, d)`` on the pipeline's device."""
    from lvdm.models.encoders import encode_text

    return encode_text(pipe.base.tokenizer, pipe.base.text_encoder, texts).to(pipe.device)


def video_record(
    pipe: Any, s: SamplingSettings, prompt: str, negative: str, seed: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """One video's sidecar: ``from_pretrained(**model)`` and ``pipe(prompt, **settings)`` reproduce it."""
    one = dataclasses.replace(s, negative_prompt=negative or None, seed=seed, num_videos_per_prompt=1)
    settings = config_to_dict(dataclasses.replace(one, batch_size=None))
    return {
        "prompt": prompt,
        "seed": seed,
        "mode": "video" if pipe.video is not None and not s.image_mode else "image",
        "settings": settings,
        "model": pipe.sources,
        "base_family": pipe.base.family,
        "prediction_type": pipe.base.prediction_type,
        "device": str(pipe.device),
        **extra,
        "lvdm_version": __version__,
    }


def make_model_fn(pipe: Any, *, image_mode: bool = False) -> Callable[..., torch.Tensor]:
    """What :meth:`VideoPipeline.model_fn <lvdm.pipeline.VideoPipeline.model_fn>` returns (documented there): the
    temporal module's denoiser, or the image model's applied frame by frame."""
    dtype, video, unet = pipe.dtype, pipe.video, pipe.base.unet

    def video_fn(x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **inputs: Any) -> torch.Tensor:
        flags = torch.ones(x.shape[0], device=x.device) if image_mode else None
        text = encoder_hidden_states.to(dtype)
        return video(x.to(dtype), t, text, image_only_indicator=flags, **inputs).float()

    part = pipe.image_part

    def image_fn(
        x: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_scale: float = 1.0,
    ) -> torch.Tensor:
        from lvdm.models.video_unet import image_unet_on_frames
        from lvdm.modules.image_attention import with_image_tokens

        text = encoder_hidden_states.to(dtype)
        if image_embeds is not None:  # an IP-Adapter: its tokens beside the text
            part.set_scale(image_scale)
            text = with_image_tokens(text, part.tokens(image_embeds))
        return image_unet_on_frames(unet, x.to(dtype), t, text).float()

    return video_fn if video is not None else image_fn


# --------------------------------------------------------------------------------------------------- helpers


def take_rows(inputs: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The videos ``rows`` of per-video model inputs."""
    return {key: value[rows] for key, value in inputs.items()}


MAX_PROMPTS = 1_000_000  # prompts in one call: far more videos than a call samples, far less memory than it fills


def as_prompts(prompt: str | Sequence[str]) -> list[str]:
    """``prompt`` as a non-empty list of UTF-8 strings (one string: a list of one)."""
    if isinstance(prompt, set | frozenset | Mapping):  # a set's order changes from run to run; a dict's keys
        raise ConfigError(
            f"prompt must be a string or a non-empty list of strings, got a {type(prompt).__name__}: give a list, "
            "in order (video k gets seed + k)"
        )
    try:  # any iterable of strings; an endless one (itertools.cycle) filled memory
        prompts = [prompt] if isinstance(prompt, str) else list(itertools.islice(prompt, MAX_PROMPTS + 1))
    except TypeError:
        prompts = []
    if len(prompts) > MAX_PROMPTS:
        raise ConfigError(f"prompt: more than {MAX_PROMPTS:,} prompts in one call (an endless iterator?); give a list")
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    for text in prompts:
        _check_utf8("prompt", text)
    return prompts


def _check_utf8(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates (a shell's $'\xff')
        raise ConfigError(f"{name} {text!r} is not UTF-8 text") from None


def negatives_for(negative: str | list[str] | None, prompts: list[str]) -> list[str]:
    """One negative prompt per prompt: ``negative`` repeated, or its list when it has one per prompt."""
    if negative is None or isinstance(negative, str):
        negatives = [negative or ""] * len(prompts)
    elif len(negative) != len(prompts):
        raise ConfigError(
            f"negative_prompt: got {len(negative)} for {len(prompts)} prompts (give one, or one per prompt)"
        )
    else:
        negatives = list(negative)
    for text in negatives:  # the tokenizer's TypeError ("TextEncodeInput must be Union[...]") was a traceback
        _check_utf8("negative_prompt", text)
    return negatives


def check_noise(name: str, noise: Any, *, finite: bool = True) -> None:
    """Given noise is a (``finite``) floating-point tensor with values (a NaN in it came out as "the sampled video
    holds NaN", blaming the guidance; numpy arrays and lists failed inside torch)."""
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.is_meta:
        what = f"{noise.device.type} {noise.dtype} tensor" if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ConfigError(f"{name} must be a floating-point torch.Tensor with values (not on meta), got a {what}")
    if finite and not torch.isfinite(noise).all():
        raise ConfigError(f"{name} holds NaN or infinite values")


def check_latents_to_decode(latents: Any, channels: int) -> None:
    """``latents`` for a ``decode``: floats ``(b, channels, f, h, w)``, none of them empty. Not checked for NaN:
    latents that blew up in sampling decode to the non-finite video's error, which names the likely causes."""
    check_noise("latents", latents, finite=False)
    if latents.ndim != 5 or latents.shape[1] != channels or 0 in latents.shape:
        raise ConfigError(f"latents must be (b, {channels}, f, h, w), none of them 0, got {tuple(latents.shape)}")


def check_mixed_lambda(pipe: Any, s: SamplingSettings, explicit: dict[str, Any]) -> None:
    """A ``mixed_lambda`` given (``explicit``) to a call whose prior is not the mixed one was taken and ignored. The
    value a call that gives none records (the module's, else the default) passes: a sidecar's replay gives it back."""
    unused = pipe.defaults.get("mixed_lambda")
    unused = DEFAULT_MIXED_LAMBDA if unused is None else unused
    if explicit.get("mixed_lambda") is not None and s.noise_prior != "mixed" and s.mixed_lambda != unused:
        raise ConfigError(
            f"mixed_lambda={s.mixed_lambda:g} is only used by noise_prior='mixed', not {s.noise_prior!r}: give "
            "noise_prior='mixed' or drop mixed_lambda"
        )


def check_base_noise_seed(base_noise: Any, noise_prior: str | None) -> None:
    """An int ``base_noise`` is a seed in range, and any goes with the mixed prior only (``None``: the module's own
    prior, not known until it loads): what ``sample.py`` asks before it loads anything."""
    if base_noise is not None and noise_prior not in ("mixed", None):
        raise ConfigError(f"base_noise is only used by noise_prior='mixed', not {noise_prior!r}")
    if _is_seed(base_noise):
        if not 0 <= int(base_noise) <= MAX_SEED:
            raise ConfigError(f"base_noise: a seed must be in 0 .. {MAX_SEED}, got {base_noise}")


def _is_seed(base_noise: Any) -> bool:
    """Whether ``base_noise`` is an integer seed (``True``/``False`` are not)."""
    return isinstance(base_noise, numbers.Integral) and not isinstance(base_noise, bool | np.bool_)


def _base_noise(base_noise: torch.Tensor | int, shape: tuple[int, ...]) -> torch.Tensor:
    """The mixed prior's base ``(b, c, 1, h, w)``: drawn from an int seed (one for all videos; its range checked
    by :func:`check_base_noise_seed` first), or a given tensor."""
    n, c, _, h, w = shape
    if _is_seed(base_noise):
        base_noise = torch.randn((1, c, 1, h, w), generator=torch.Generator().manual_seed(int(base_noise)))
    if not isinstance(base_noise, torch.Tensor):
        raise ConfigError(f"base_noise must be an int seed or a tensor, got {base_noise!r}")
    check_noise("base_noise", base_noise)
    if base_noise.ndim != 5 or base_noise.shape[0] not in (1, n) or tuple(base_noise.shape[1:]) != (c, 1, h, w):
        rows = "1" if n == 1 else f"1 or {n}"
        raise ConfigError(f"base_noise must be ({rows}, {c}, 1, {h}, {w}), got {tuple(base_noise.shape)}")
    return base_noise.float().expand(n, c, 1, h, w)  # (1 or b) c 1 h w -> b c 1 h w


def describe_base_noise(base_noise: torch.Tensor | int | None) -> int | str | None:
    """How a sidecar records the base noise: its seed, or a fingerprint of a given tensor."""
    if base_noise is None:
        return None
    if isinstance(base_noise, numbers.Integral):
        return int(base_noise)
    digest = hashlib.sha256(base_noise.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    return f"tensor {tuple(base_noise.shape)} sha256:{digest}"


def random_seed() -> int:
    """A seed for a call given none (recorded in its sidecars, so the videos can be replayed)."""
    return secrets.randbelow(2**31)
